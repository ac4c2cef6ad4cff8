"""StableSR's SFT layers: spatial feature transforms of the UNet residual blocks by the encoder maps.

Paper (StableSR, eq. 1): every residual block of the frozen Stable Diffusion UNet is modulated as
``F' = (1 + gamma) * F + beta`` with ``gamma, beta = M(cond)`` computed from the time-aware encoder's
map at the feature's scale.  The released weights use the SPADE form of that transform: the feature is
first normalised by an affine GroupNorm (``param_free_norm``, trained despite its name), then
``out = norm(F) * (1 + gamma) + beta`` with ``M`` = conv3x3 + ReLU (``mlp_shared``) followed by two
3x3 convs (``mlp_gamma``, ``mlp_beta``).  The modulated feature is the output of the residual branch,
just before the skip connection is added (:func:`resblock_forward_with_sft`).

Layers are addressed by the UNet path of the ResBlock they modulate (``"input_blocks.1.0"``,
``"middle_block.0"``, ``"output_blocks.5.0"``); the released key
``model.diffusion_model.<path>.spade.<param>`` becomes ``<path>.<param>`` in :class:`SFTLayers`.
Nothing here depends on a host application: the ResBlock is duck-typed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...descriptor import StateDict, shape_of
from ...errors import InvalidInputError, UnsupportedModelError
from .encoder import Cond, GroupNorm32, select_cond

__all__ = [
    "SFTLayer",
    "SFTLayers",
    "attach_sft",
    "bind_sft_forward",
    "resblock_channels",
    "infer_sft_spec",
    "resblock_forward_with_sft",
]

_ROOTS = ("input_blocks", "middle_block", "output_blocks")
_PATH_RE = re.compile(r"^(input_blocks\.\d+\.0|middle_block\.\d+|output_blocks\.\d+\.0)$")


class SFTLayer(nn.Module):
    """One SFT (SPADE-form) modulation layer.

    Args:
        channels: channels of the modulated UNet feature (C).
        cond_channels: channels of the encoder condition maps (256 released).
        hidden_channels: width of the shared conv (128 released).

    Shape:
        h (B, C, H, W) and a condition dict holding a (B_c, cond_channels, H, W) map -> (B, C, H, W)
        in h's dtype.  B must be a multiple of B_c: the maps are tiled along the batch
        (``[cond chunk, uncond chunk]`` batching of classifier-free guidance).
    """

    def __init__(self, channels: int, cond_channels: int = 256, hidden_channels: int = 128) -> None:
        super().__init__()
        self.channels = channels
        self.param_free_norm = GroupNorm32(channels)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden_channels, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden_channels, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden_channels, channels, 3, padding=1)

    def modulation(self, segmap: Tensor) -> tuple[Tensor, Tensor]:
        """``(gamma, beta)``, each (B_c, C, H, W), from one condition map (B_c, cond_channels, H, W)."""
        w = self.mlp_gamma.weight
        actv = self.mlp_shared(segmap.to(device=w.device, dtype=w.dtype))
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, h: Tensor, cond: Cond | Tensor) -> Tensor:
        """Modulate ``h`` by the map of ``cond`` matching its size (see ``select_cond``).

        Args:
            h: (B, C, H, W) residual-branch output.
            cond: the encoder output dict (``{str(w): map}`` or ``{(h, w): map}``), or the map itself.

        Returns:
            ``norm(h) * (1 + gamma) + beta``, (B, C, H, W), dtype of ``h``.
        """
        if h.dim() != 4 or h.shape[1] != self.channels:
            raise InvalidInputError(f"SFT layer expects a (B, {self.channels}, H, W) feature, got {tuple(h.shape)}")
        segmap = cond if isinstance(cond, Tensor) else select_cond(cond, h)
        gamma, beta = self.modulation(segmap)
        gamma, beta = _match_batch(gamma, h.shape[0]), _match_batch(beta, h.shape[0])
        normalized = self.param_free_norm(h).to(gamma.dtype)
        return torch.addcmul(beta, normalized, 1 + gamma).to(h.dtype)


def _match_batch(t: Tensor, batch: int) -> Tensor:
    n = t.shape[0]
    if n == batch:
        return t
    if batch % n:
        raise InvalidInputError(
            f"StableSR condition batch {n} does not divide the UNet batch {batch}; compute the condition for "
            "each chunk of the batch (e.g. cond / uncond) or with the same batch size"
        )
    return t.repeat(batch // n, 1, 1, 1)


def _sort_key(path: str) -> tuple[int, int]:
    parts = path.split(".")
    return _ROOTS.index(parts[0]), int(parts[1])


class SFTLayers(nn.Module):
    """The SFT layers of a whole UNet, addressable by ResBlock path.

    Stored as nested modules mirroring the UNet (``input_blocks.1.0``, ``middle_block.0``, ...), so
    ``state_dict()`` keys are ``<path>.<param>`` (the released key minus ``model.diffusion_model.``
    and ``.spade``).  An SD2.1 UNet has 22: input_blocks 1, 2, 4, 5, 7, 8, 10, 11; middle_block 0, 2;
    output_blocks 0..11.

    Args:
        channels: ``{path: C}`` for every modulated ResBlock.
        cond_channels: encoder map channels.
        hidden_channels: width of ``mlp_shared``.
    """

    def __init__(self, channels: Mapping[str, int], cond_channels: int = 256, hidden_channels: int = 128) -> None:
        super().__init__()
        bad = [p for p in channels if not _PATH_RE.match(p)]
        if bad:
            raise UnsupportedModelError(
                f"SFT layer paths {bad} are not UNet ResBlock paths (expected 'input_blocks.N.0', "
                "'middle_block.N' or 'output_blocks.N.0')"
            )
        self.cond_channels = cond_channels
        self.hidden_channels = hidden_channels
        self._paths = sorted(channels, key=_sort_key)
        for path in self._paths:
            *parents, leaf = path.split(".")
            node: nn.Module = self
            for name in parents:
                child = node._modules.get(name)
                if child is None:
                    child = nn.ModuleDict()
                    node.add_module(name, child)
                node = child
            node.add_module(leaf, SFTLayer(int(channels[path]), cond_channels, hidden_channels))

    @property
    def paths(self) -> list[str]:
        """ResBlock paths in UNet order (input blocks, middle block, output blocks)."""
        return list(self._paths)

    @property
    def channels(self) -> dict[str, int]:
        return {p: self[p].channels for p in self._paths}

    def get(self, path: str) -> SFTLayer | None:
        """The layer of ResBlock ``path``, or None when that block is not modulated."""
        if path not in self._paths:
            return None
        node: nn.Module = self
        for name in path.split("."):
            node = node._modules[name]  # type: ignore[assignment]
        return node  # type: ignore[return-value]

    def __getitem__(self, path: str) -> SFTLayer:
        layer = self.get(path)
        if layer is None:
            raise KeyError(f"no SFT layer for {path!r}; modulated ResBlocks: {self._paths}")
        return layer

    def __contains__(self, path: object) -> bool:
        return path in self._paths

    def __len__(self) -> int:
        return len(self._paths)

    def __iter__(self) -> Iterator[tuple[str, SFTLayer]]:  # type: ignore[override]
        return ((p, self[p]) for p in self._paths)

    def forward(self, path: str, h: Tensor, cond: Cond | Tensor) -> Tensor:
        """Apply the layer of ``path`` to ``h`` (see :meth:`SFTLayer.forward`)."""
        return self[path](h, cond)


def infer_sft_spec(state_dict: StateDict, prefix: str = "model.diffusion_model.") -> tuple[dict[str, int], int, int]:
    """SFT layer paths and sizes from the ``<prefix><path>.spade.*`` keys.

    Args:
        state_dict: a released module or full checkpoint (keys with ``prefix``).
        prefix: the UNet prefix.

    Returns:
        ``({path: C}, cond_channels, hidden_channels)``.

    Raises:
        UnsupportedModelError: no spade keys, or layers with differing condition / hidden widths.
    """
    marker = ".spade.param_free_norm.weight"
    channels: dict[str, int] = {}
    shapes: set[tuple[int, int]] = set()
    for key in state_dict:
        if key.startswith(prefix) and key.endswith(marker):
            path = key[len(prefix) : -len(marker)]
            channels[path] = shape_of(state_dict, key, "StableSR SFT", ndim=1)[0]
            shared = f"{prefix}{path}.spade.mlp_shared.0.weight"
            if shared not in state_dict:
                raise UnsupportedModelError(f"SFT layer {path}: missing {shared}")
            hidden, cond = shape_of(state_dict, shared, "StableSR SFT", ndim=4)[:2]
            shapes.add((cond, hidden))
    if not channels:
        raise UnsupportedModelError(f"no StableSR SFT layers ({prefix}<block>.spade.*) in the state dict")
    if len(shapes) != 1:
        raise UnsupportedModelError(f"SFT layers disagree on (condition, hidden) widths: {sorted(shapes)}")
    cond_ch, hidden = shapes.pop()
    return dict(sorted(channels.items(), key=lambda kv: _sort_key(kv[0]))), cond_ch, hidden


# ---------------------------------------------------------------------------- ResBlock hook
def resblock_forward_with_sft(
    block: nn.Module,
    x: Tensor,
    emb: Tensor,
    sft_layer: Callable[[Tensor, Any], Tensor] | None,
    cond: Any,
    transformer_options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Run an ldm/ComfyUI-style UNet ResBlock with StableSR's SFT on its residual branch.

    Recomputes the block from its parts and modulates the residual-branch output before the skip is
    added: ``skip(x) + sft(out_layers(in_layers(x) + emb_layers(emb)), cond)``.  The block is
    duck-typed: it needs ``in_layers``, ``out_layers`` (Sequentials, first element a norm),
    ``skip_connection`` and ``emb_layers``; optional attributes, with their defaults when absent:
    ``updown`` (False; then ``h_upd``/``x_upd`` resample between ``in_layers[:-1]`` and its conv),
    ``use_scale_shift_norm`` (False), ``skip_t_emb`` (False, also when ``emb_layers`` is None),
    ``exchange_temb_dims`` (False).  A ``transformer_options["group_norm_wrapper"]`` callable
    ``(norm, h, transformer_options) -> h`` is honoured for the norms, as Forge's UNet does.

    Args:
        block: the ResBlock (its own ``forward`` is not called).
        x: (B, C_in, H, W) block input.
        emb: (B, emb_channels) UNet timestep embedding.
        sft_layer: ``SFTLayer`` (or any ``(h, cond) -> h``); None runs the plain block.
        cond: the condition dict (or map) handed to ``sft_layer``.
        transformer_options: optional host options (see above).

    Returns:
        (B, C_out, H', W'), the block's output.
    """
    opts = transformer_options or {}
    gn_wrap = opts.get("group_norm_wrapper")

    def run(layers: nn.Module, h: Tensor) -> Tensor:
        # A Sequential whose first element is a norm; a host may wrap the norm call.
        if gn_wrap is None:
            return layers(h)
        h = gn_wrap(layers[0], h, opts)
        return layers[1:](h)

    in_layers, out_layers = block.in_layers, block.out_layers
    if getattr(block, "updown", False):
        h = in_layers[:-1](x) if gn_wrap is None else in_layers[1:-1](gn_wrap(in_layers[0], x, opts))
        h = block.h_upd(h)
        x = block.x_upd(x)
        h = in_layers[-1](h)
    else:
        h = run(in_layers, x)

    emb_out: Tensor | None = None
    emb_layers = getattr(block, "emb_layers", None)
    if not getattr(block, "skip_t_emb", False) and emb_layers is not None:
        emb_out = emb_layers(emb).to(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
    if getattr(block, "use_scale_shift_norm", False):
        norm = out_layers[0]
        h = gn_wrap(norm, h, opts) if gn_wrap is not None else norm(h)
        if emb_out is not None:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, h, 1 + scale)
        h = out_layers[1:](h)
    else:
        if emb_out is not None:
            if getattr(block, "exchange_temb_dims", False):
                emb_out = emb_out.movedim(1, 2)  # (b, t, c, ...) -> (b, c, t, ...)
            h = h + emb_out
        h = run(out_layers, h)
    if sft_layer is not None:
        h = sft_layer(h, cond)
    return block.skip_connection(x) + h


def bind_sft_forward(
    block: nn.Module, sft_layer: Callable[[Tensor, Any], Tensor] | None, get_cond: Callable[[], Any]
) -> Callable[..., Tensor]:
    """A replacement for ``block._forward(x, emb, ...)`` that applies ``sft_layer`` with the current condition.

    Args:
        block: the UNet ResBlock.
        sft_layer: its SFT layer.
        get_cond: returns the condition dict to use now (called on every block call, so a sampler can
            swap it per step or per tile).

    Returns:
        ``f(x, emb, transformer_options=None, *extra)``; extra positional arguments are ignored.
    """

    def forward(x: Tensor, emb: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        opts = kwargs.get("transformer_options", args[0] if args and isinstance(args[0], Mapping) else None)
        return resblock_forward_with_sft(block, x, emb, sft_layer, get_cond(), opts)

    return forward


# ---------------------------------------------------------------------------- a host's UNet
def _resblock(unet: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` ("input_blocks.1.0") of an ldm-layout UNet, if it is a ResBlock."""
    try:
        block = functools.reduce(getattr, path.split("."), unet)
    except (AttributeError, IndexError, TypeError):
        return None
    return block if all(hasattr(block, a) for a in ("in_layers", "out_layers", "skip_connection")) else None


def resblock_channels(unet: nn.Module) -> Callable[[str], int | None]:
    """``channels_of(path)`` for :func:`~realsr_core.models.stablesr.sd.check_module_fits` on any ldm-layout UNet
    (ComfyUI's, the webui's ldm or Forge's): the ResBlock's output channels, None when there is none."""
    return lambda path: getattr(_resblock(unet, path), "out_channels", None)


def attach_sft(unet: nn.Module, sft_layers: SFTLayers, get_cond: Callable[[], Any]) -> Callable[[], None]:
    """Modulate a host UNet's ResBlocks by the SFT layers, at instance level; returns the function undoing it.

    Each ResBlock gets an instance ``_forward`` (the class method is untouched, so no other model is
    affected) that applies its SFT layer while ``get_cond()`` returns a condition and runs the block as
    before when it returns None (another sampler on the same UNet).  A ``_forward`` that another extension
    set on the instance is kept and put back by the returned ``detach``.

    Args:
        unet: an ldm-layout UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``).
        sft_layers: the module's SFT layers (``(path, layer)`` pairs).
        get_cond: the condition of the UNet call in progress, or None.
    """
    saved: dict[str, Any] = {}
    for path, layer in sft_layers:
        block = _resblock(unet, path)
        if block is None:
            raise InvalidInputError(f"the UNet has no ResBlock at {path}")
        if "_forward" in block.__dict__:
            saved[path] = block.__dict__["_forward"]
        plain = block._forward  # the class method (or a previous instance override), bound
        with_sft = bind_sft_forward(block, layer, get_cond)

        def forward(x: Tensor, emb: Tensor, *args: Any, _plain=plain, _sft=with_sft, **kwargs: Any) -> Tensor:
            if get_cond() is None:
                return _plain(x, emb, *args, **kwargs)
            return _sft(x, emb, *args, **kwargs)

        block._forward = forward

    def detach() -> None:
        for path, _ in sft_layers:
            block = _resblock(unet, path)
            if block is not None:
                block.__dict__.pop("_forward", None)
                if path in saved:
                    block._forward = saved.pop(path)

    return detach
