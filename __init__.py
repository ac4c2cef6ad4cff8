"""ComfyUI entry point of the RealSR node pack.

ComfyUI imports this package from ``custom_nodes/``; the nodes live in ``nodes/`` and the
host-agnostic core in ``realsr_core/``.  Nothing here runs outside ComfyUI.

The pack's requirements are checked when it loads: a missing package fails the import here, naming
it and the install command (ComfyUI then lists the pack as failed to import, with this message in
its log), rather than a workflow failing halfway with "No module named ...".
"""

from .install import missing_requirements


def _check_requirements() -> None:
    import sys
    from pathlib import Path

    missing = missing_requirements()
    if missing:
        python = sys.executable
        raise ImportError(
            f"RealSR nodes: missing Python package(s) for {python}: {', '.join(missing)}.\n"
            f'Install them with:  "{python}" -m pip install ' + " ".join(f'"{r}"' for r in missing) + "\n"
            f'or run  "{python}" install.py  in {Path(__file__).resolve().parent}, then restart ComfyUI.'
        )


_check_requirements()


async def comfy_entrypoint():  # noqa: ANN201 - the host's ComfyExtension type is only importable inside ComfyUI
    from .nodes import RealSRExtension

    return RealSRExtension()
