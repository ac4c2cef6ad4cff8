"""ComfyUI entry point of the RealSR node pack.

ComfyUI imports this package from ``custom_nodes/``; the nodes live in ``nodes/`` and the
host-agnostic core in ``realsr_core/``.  Nothing here runs outside ComfyUI.
"""


async def comfy_entrypoint():  # noqa: ANN201 - the host's ComfyExtension type is only importable inside ComfyUI
    from .nodes import RealSRExtension

    return RealSRExtension()
