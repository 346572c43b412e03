"""SeFi-IDE for ComfyUI: learn an identity from one face photo, then put the person into any prompt."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.template_cards import register_card_route

register_card_route()  # the template cards, also where ComfyUI serves only the templates' .json (0.38)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
