"""The RealSR controls of the Extras tab: MM-RealSR scores, LWay adaptation, colour fix against the input.

The built-in "Upscale" step runs the chosen upscaler; these controls reach a RealSR upscaler through
:data:`realsr_webui.upscaler.NEXT`, set before any step runs (``process_firstpass``) and cleared when this
step (after "Upscale") has applied the colour fix.  Through the API: ``POST /realsr/v1/extra-single-image``
(see :mod:`realsr_webui.api`), since the webui's own Extras endpoint only forwards the built-in steps' fields.
"""

from __future__ import annotations

import gradio as gr
from modules import scripts_postprocessing, shared

from realsr_core.adapt.plot import loss_curve_image
from realsr_core.colorfix import color_fix
from realsr_core.errors import InvalidInputError

from . import host
from . import upscaler as up

NAME = "RealSR"
COLOR_FIXES = ["none", "wavelet", "adain"]
# Every control, with its default; the API fills the ones a request leaves out with these.
DEFAULTS = {"enable": False, "blur_auto": True, "blur": 0.5, "noise_auto": True, "noise": 0.5,
            "color_fix": "none", "color_fix_strength": 1.0, "lway_iterations": 0, "lway_lr": 1e-5}


def _clear_upscale_cache() -> None:
    """Empty the built-in Upscale step's result cache: its key (image, upscaler, size) does not see our options,
    so a cached result of other options would be returned, and ours would be returned to a plain run later."""
    from modules import scripts

    for script in scripts.scripts_postproc.scripts or []:
        cache = getattr(type(script), "upscale", None)
        cache = getattr(cache, "__globals__", {}).get("upscale_cache")
        if script.name == "Upscale" and isinstance(cache, dict):
            cache.clear()


def _check(args: dict) -> dict:
    a = {**DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    for key in ("blur", "noise", "color_fix_strength"):
        if not 0.0 <= float(a[key]) <= 1.0:
            raise InvalidInputError(f"RealSR {key} must be in [0, 1], got {a[key]!r}")
    if a["color_fix"] not in COLOR_FIXES:
        raise InvalidInputError(f"RealSR color_fix must be one of {COLOR_FIXES}, got {a['color_fix']!r}")
    if not 0 <= int(a["lway_iterations"]) <= 2000:
        raise InvalidInputError(f"RealSR lway_iterations must be in [0, 2000], got {a['lway_iterations']!r}")
    if not 0.0 < float(a["lway_lr"]) <= 1e-3:
        raise InvalidInputError(f"RealSR lway_lr must be in (0, 1e-3], got {a['lway_lr']!r}")
    return a


class RealSRExtras(scripts_postprocessing.ScriptPostprocessing):
    name = NAME
    order = 1100  # after the built-in Upscale (1000): the colour fix compares its result with the input

    def ui(self) -> dict:
        with gr.Accordion("RealSR", open=False):
            enable = gr.Checkbox(False, label="Enable RealSR controls", elem_id="realsr_enable")
            with gr.Row():
                blur_auto = gr.Checkbox(True, label="MM-RealSR blur: auto (the model's estimate)")
                blur = gr.Slider(0.0, 1.0, 0.5, step=0.01, label="blur (0 clean .. 1 heavily blurred)")
            with gr.Row():
                noise_auto = gr.Checkbox(True, label="MM-RealSR noise: auto")
                noise = gr.Slider(0.0, 1.0, 0.5, step=0.01, label="noise (0 clean .. 1 very noisy / JPEG)")
            with gr.Row():
                color_fix_method = gr.Radio(COLOR_FIXES, value="none", label="Colour fix against the input")
                strength = gr.Slider(0.0, 1.0, 1.0, step=0.05, label="colour fix strength")
            with gr.Row():
                iterations = gr.Slider(0, 700, 0, step=10, label="LWay adaptation iterations (0 = off)")
                lr = gr.Number(1e-5, label="LWay learning rate")
        return {"enable": enable, "blur_auto": blur_auto, "blur": blur, "noise_auto": noise_auto, "noise": noise,
                "color_fix": color_fix_method, "color_fix_strength": strength, "lway_iterations": iterations,
                "lway_lr": lr}

    def process_firstpass(self, pp: scripts_postprocessing.PostprocessedImage, **args) -> None:
        up.NEXT = None
        if not args.get("enable"):
            return
        a = _check(args)
        options = {"blur": None if a["blur_auto"] else float(a["blur"]),
                   "noise": None if a["noise_auto"] else float(a["noise"])}
        up.NEXT = up.Request(options=options, lway_iterations=int(a["lway_iterations"]), lway_lr=float(a["lway_lr"]))
        self.original = pp.image
        _clear_upscale_cache()

    def process(self, pp: scripts_postprocessing.PostprocessedImage, **args) -> None:
        req, up.NEXT = up.NEXT, None
        if not args.get("enable") or req is None:
            return
        a = _check(args)
        _clear_upscale_cache()
        if req.used:
            pp.info["RealSR model"] = req.used
            if req.scores:
                auto = [k for k, v in req.options.items() if v is None]
                pp.info["RealSR scores"] = (f"blur {req.scores[0]:.3f}, noise {req.scores[1]:.3f}"
                                            + (f" ({' and '.join(auto)} estimated)" if auto else ""))
        elif any(v is not None for v in req.options.values()) or req.lway_iterations:
            pp.info["RealSR"] = "scores and LWay apply to RealSR upscalers only; choose one as Upscaler 1"
        if a["color_fix"] != "none" and float(a["color_fix_strength"]) > 0:
            out = color_fix(host.to_tensor(pp.image), host.to_tensor(self.original), method=a["color_fix"],
                            strength=float(a["color_fix_strength"]))
            pp.image = host.to_image(out)
            pp.info["RealSR colour fix"] = f"{a['color_fix']} {float(a['color_fix_strength']):g}"
        if req.losses:
            pp.info["RealSR LWay"] = f"{len(req.losses)} iterations, lr {req.lway_lr:g}, loss {req.losses[0]:.4g} -> {req.losses[-1]:.4g}"
            curve = loss_curve_image(req.losses, title="LWay self-supervised loss")
            pp.extra_images.append(pp.create_copy(host.to_image(curve.permute(2, 0, 1)[None]), nametags=["lway-loss"],
                                                  disable_processing=True))
        shared.state.textinfo = ""
