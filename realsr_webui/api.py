"""``POST /realsr/v1/extra-single-image``: the Extras tab's run, with the RealSR controls, over HTTP.

The webui's own ``/sdapi/v1/extra-single-image`` forwards only the built-in steps' fields, so the RealSR
controls would always be off there.  This route runs the same Extras pipeline (``run_postprocessing``, under
the webui's queue lock) with the Upscale step's fields plus a ``realsr`` object of :data:`extras.DEFAULTS` keys.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from realsr_core.errors import RealSRError

from . import extras


class ExtrasRequest(BaseModel):
    image: str = Field(description="base64 PNG / JPEG (a data: URL prefix is accepted)")
    upscaler_1: str = "None"
    upscaling_resize: float = 4.0
    realsr: dict[str, Any] = Field(default_factory=dict, description=f"RealSR controls: {sorted(extras.DEFAULTS)}")


def register(app: FastAPI) -> None:
    from modules import postprocessing, scripts
    from modules.api.api import decode_base64_to_image, encode_pil_to_base64
    from modules.call_queue import queue_lock

    def run(req: ExtrasRequest) -> dict:
        unknown = sorted(set(req.realsr) - set(extras.DEFAULTS))
        if unknown:
            raise HTTPException(400, f"unknown RealSR control(s) {unknown}; expected some of {sorted(extras.DEFAULTS)}")
        image = decode_base64_to_image(req.image)
        args = scripts.scripts_postproc.create_args_for_run({
            "Upscale": {"upscale_enabled": True, "upscale_mode": 0, "upscale_by": req.upscaling_resize,
                        "max_side_length": 0, "upscale_to_width": 0, "upscale_to_height": 0, "upscale_crop": False,
                        "upscaler_1_name": req.upscaler_1, "upscaler_2_name": "None", "upscaler_2_visibility": 0.0},
            extras.NAME: {**extras.DEFAULTS, "enable": True, **req.realsr},
        })
        with queue_lock:
            try:
                outputs, info, _ = postprocessing.run_postprocessing(0, image, None, "", "", True, *args,
                                                                     save_output=False)
            except (RealSRError, FileNotFoundError, ValueError) as e:
                raise HTTPException(400, str(e)) from None
        return {"image": encode_pil_to_base64(outputs[0]), "extra_images": [encode_pil_to_base64(o) for o in outputs[1:]],
                "html_info": info}

    app.add_api_route("/realsr/v1/extra-single-image", run, methods=["POST"])
