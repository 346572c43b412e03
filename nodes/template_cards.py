"""The template browser's card pictures (`example_workflows/<name>.jpg`) on every ComfyUI.

Up to 0.28 ComfyUI serves the whole `example_workflows/` folder statically; newer releases (0.38 read) serve the
templates' `.json` files only, and the frontend, which asks for `/api/workflow_templates/<pack>/<name>.jpg` for every
card, then shows its placeholder and logs a failed fetch in the browser console. A route of our own for our `.jpg`
files only keeps the cards: custom nodes' routes are registered before the host's own template handler, so the
first match is ours; where the host serves the folder itself, its static route answers first with the same file.
"""
from __future__ import annotations

from pathlib import Path

CARDS = Path(__file__).absolute().parents[1] / "example_workflows"
# the name ComfyUI lists our templates under: this pack's folder in custom_nodes/ (a clone and a registry install
# name it differently; a symlinked folder keeps the link's name)
MODULE_NAME = CARDS.parent.name


def card_file(name: str) -> Path | None:
    """Our card picture called `name`, or None (not a .jpg, not directly in example_workflows/, missing)."""
    if not name.endswith(".jpg") or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = CARDS / name
    return path if path.is_file() else None


def add_card_route(routes, module_name: str = MODULE_NAME) -> None:
    """GET /workflow_templates/<module_name>/<name>.jpg on an aiohttp RouteTableDef (ComfyUI adds the /api twin)."""
    from aiohttp import web

    @routes.get(rf"/workflow_templates/{module_name}/{{name:[^/]+\.jpg}}")
    async def template_card(request: web.Request) -> web.StreamResponse:
        path = card_file(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)


def register_card_route() -> bool:
    """Add the route to the running ComfyUI server; False where there is none (the batch command, tests)."""
    import sys

    server = sys.modules.get("server")  # ComfyUI's server.py, imported before custom nodes; never import it here
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    add_card_route(instance.routes)
    return True
