"""ComfyUI V3 adapters over ``realsr_core`` (imported only inside ComfyUI)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class RealSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
