"""SeFi-IDE for ComfyUI: learn an identity from one face photo, then put the person into any prompt."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.template_cards import register_card_route

register_card_route()  # the template cards, also where ComfyUI serves only the templates' .json (0.38)

# served at /extensions/<pack folder>/: the frontend's node help reads docs/<NodeName>.md there (CONTRIBUTING.md)
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
