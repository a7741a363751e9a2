"""Guidance Lab — diffusion guidance research as ComfyUI nodes (V3 extension entry point)."""
from comfy_api.latest import ComfyExtension


class GuidanceLabExtension(ComfyExtension):
    async def get_node_list(self):
        from .nodes import NODES
        return list(NODES)


async def comfy_entrypoint() -> GuidanceLabExtension:
    return GuidanceLabExtension()
