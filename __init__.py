"""Guidance Lab — diffusion guidance research as ComfyUI nodes (V3 extension entry point).

Nothing is imported at module level, so tools that import the folder as a package (pytest) need no host.
"""


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class GuidanceLabExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return GuidanceLabExtension()
