"""Writes the generated workflows in ``workflows/`` (ComfyUI UI format): the shipped-model default and one
StableSR workflow per official setup.

Run ``python docs/make_workflows.py`` after changing these nodes' widgets; the host tests check every
workflow against the live node schemas (``tests/host/test_server.py``, ``test_stablesr_host.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOADER_OUTPUTS = [("FeMaSR", "REALSR_FEMASR_MODEL"), ("MM-RealSR", "REALSR_MMREALSR_MODEL"),
                  ("StableSR", "REALSR_STABLESR_MODULE"), ("CFW VAE", "REALSR_CFW_VAE"), ("SR model", "REALSR_MODEL"),
                  ("LWay module", "REALSR_LWAY_MODULE"), ("UPSCALE_MODEL", "UPSCALE_MODEL")]
SAMPLER_INPUTS = [("model", "MODEL"), ("stablesr", "REALSR_STABLESR_MODULE"), ("vae", "VAE"), ("image", "IMAGE"),
                  ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("cfw_vae", "REALSR_CFW_VAE")]


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    size: tuple[int, int]
    widgets: list
    inputs: list[tuple[str, str]] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    title: str | None = None


class Graph:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.links: list[list] = []

    def add(self, *args, **kw) -> Node:
        node = Node(len(self.nodes) + 1, *args, **kw)
        self.nodes.append(node)
        return node

    def link(self, src: Node, slot: int, dst: Node, name: str) -> None:
        dst_slot = [n for n, _ in dst.inputs].index(name)
        self.links.append([len(self.links) + 1, src.id, slot, dst.id, dst_slot, src.outputs[slot][1]])

    def to_json(self) -> dict:
        nodes = []
        for order, n in enumerate(self.nodes):
            ins = [{"name": name, "type": t, "link": next((lk[0] for lk in self.links if lk[3] == n.id and lk[4] == i), None)}
                   for i, (name, t) in enumerate(n.inputs)]
            outs = [{"name": name, "type": t, "links": [lk[0] for lk in self.links if lk[1] == n.id and lk[2] == i],
                     "slot_index": i} for i, (name, t) in enumerate(n.outputs)]
            d = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order,
                 "mode": 0, "inputs": ins, "outputs": outs, "properties": {"Node name for S&R": n.type},
                 "widgets_values": n.widgets}
            if n.title:
                d["title"] = n.title
            nodes.append(d)
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes, "links": self.links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}


def stablesr(checkpoint: str, module: str, *, steps: int = 200, cfw: str | None = None, prefix: str) -> dict:
    """SD checkpoint + StableSR module (+ CFW VAE) -> StableSR Sampler (official defaults) -> SaveImage."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (40, 60), (315, 98), [checkpoint],
                 outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    loader = g.add("RealSR_LoadModel", (40, 220), (315, 126), [module], outputs=LOADER_OUTPUTS)
    image = g.add("LoadImage", (40, 400), (315, 314), ["realsr_example.png", "image"],
                  outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    pos = g.add("CLIPTextEncode", (420, 60), (340, 160), [""], inputs=[("clip", "CLIP")],
                outputs=[("CONDITIONING", "CONDITIONING")], title="Empty prompt (positive)")
    neg = g.add("CLIPTextEncode", (420, 260), (340, 160), [""], inputs=[("clip", "CLIP")],
                outputs=[("CONDITIONING", "CONDITIONING")], title="Empty prompt (negative)")
    cfw_loader = None
    if cfw:
        cfw_loader = g.add("RealSR_LoadModel", (420, 460), (315, 126), [cfw], outputs=LOADER_OUTPUTS,
                           title="Load CFW VAE")
    # upscale, seed, control, steps, sampler, scheduler, cfg, start, tile, overlap, color fix, cfw w, tiled vae
    sampler = g.add("RealSR_StableSRSampler", (820, 60), (340, 500),
                    [4.0, 42, "fixed", steps, "stablesr_ddpm", "normal", 1.0, "lr_latent", 0, 0, "wavelet", 0.5, "auto"],
                    inputs=SAMPLER_INPUTS, outputs=[("image", "IMAGE"), ("latent", "LATENT")])
    save = g.add("SaveImage", (1200, 60), (400, 420), [prefix], inputs=[("images", "IMAGE")])
    g.link(ckpt, 0, sampler, "model")
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    g.link(ckpt, 2, sampler, "vae")
    g.link(loader, 2, sampler, "stablesr")
    g.link(image, 0, sampler, "image")
    g.link(pos, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    if cfw_loader is not None:
        g.link(cfw_loader, 3, sampler, "cfw_vae")
    g.link(sampler, 0, save, "images")
    return g.to_json()


def default_upscale(model: str = "built-in/crlsr_x4.safetensors") -> dict:
    """The pack's out-of-the-box workflow: the shipped CRL-SR x4 model, no download."""
    g = Graph()
    image = g.add("LoadImage", (40, 60), (315, 314), ["realsr_example.png", "image"],
                  outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    loader = g.add("RealSR_LoadModel", (40, 420), (315, 150), [model], outputs=LOADER_OUTPUTS)
    up = g.add("RealSR_Upscale", (420, 60), (315, 130), ["auto", 16], inputs=[("model", "REALSR_MODEL"),
               ("image", "IMAGE")], outputs=[("image", "IMAGE")])
    save = g.add("SaveImage", (800, 60), (400, 420), ["realsr_crlsr_x4"], inputs=[("images", "IMAGE")])
    g.link(loader, 4, up, "model")
    g.link(image, 0, up, "image")
    g.link(up, 0, save, "images")
    return g.to_json()


def lway_finetune(model: str = "built-in/crlsr_x4.safetensors", module: str = "built-in/lway_rec.safetensors") -> dict:
    """LWay: adapt the shipped CRL-SR x4 to the loaded image, then upscale it with the adapted copy."""
    g = Graph()
    image = g.add("LoadImage", (40, 60), (315, 314), ["realsr_example.png", "image"],
                  outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    loader = g.add("RealSR_LoadModel", (40, 420), (315, 170), [model], outputs=LOADER_OUTPUTS)
    module_loader = g.add("RealSR_LoadModel", (40, 640), (315, 170), [module], outputs=LOADER_OUTPUTS,
                          title="Load LWay module")
    # iterations, learning rate, patch size, batch size, params, seed (bench/bench_lway.py's settings)
    tune = g.add("RealSR_LWayFinetune", (420, 60), (340, 260), [LWAY_ITERATIONS, LWAY_LR, 64, 4, "all", 0],
                 inputs=[("model", "REALSR_MODEL"), ("images", "IMAGE"), ("lway", "REALSR_LWAY_MODULE")],
                 outputs=[("model", "REALSR_MODEL"), ("loss", "IMAGE")])
    up = g.add("RealSR_Upscale", (820, 60), (315, 130), ["auto", 16], inputs=[("model", "REALSR_MODEL"),
               ("image", "IMAGE")], outputs=[("image", "IMAGE")])
    save = g.add("SaveImage", (1180, 60), (400, 420), ["realsr_lway_crlsr_x4"], inputs=[("images", "IMAGE")])
    plot = g.add("PreviewImage", (820, 260), (340, 240), [], inputs=[("images", "IMAGE")], title="LWay loss")
    g.link(loader, 4, tune, "model")
    g.link(image, 0, tune, "images")
    g.link(module_loader, 5, tune, "lway")
    g.link(tune, 0, up, "model")
    g.link(image, 0, up, "image")
    g.link(up, 0, save, "images")
    g.link(tune, 1, plot, "images")
    return g.to_json()


LWAY_ITERATIONS, LWAY_LR = 100, 1e-5

WORKFLOWS = {
    "crlsr_x4_default.json": default_upscale,
    "lway_crlsr_x4.json": lway_finetune,
    "stablesr_sd21_512.json": lambda: stablesr("v2-1_512-ema-pruned.safetensors", "stablesr_000117.ckpt",
                                               prefix="realsr_stablesr_x4"),
    "stablesr_sd21_768v.json": lambda: stablesr("v2-1_768-ema-pruned.safetensors", "webui_768v_139.ckpt",
                                                prefix="realsr_stablesr_768v_x4"),
    "stablesr_turbo.json": lambda: stablesr("stablesr_turbo.ckpt", "stablesr_turbo.ckpt", steps=4,
                                            prefix="realsr_stablesr_turbo_x4"),
    "stablesr_sd21_512_cfw.json": lambda: stablesr("v2-1_512-ema-pruned.safetensors", "stablesr_000117.ckpt",
                                                   cfw="vqgan_cfw_00011.ckpt", prefix="realsr_stablesr_cfw_x4"),
}


def main() -> None:
    for name, make in WORKFLOWS.items():
        (ROOT / "workflows" / name).write_text(json.dumps(make(), indent=2) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
