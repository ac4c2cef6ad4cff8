"""The Stable Diffusion 2.x text encoder: the OpenCLIP ViT-H/14 text tower, read at its penultimate layer.

SD 2.x (and StableSR, which is an SD 2.1 fine-tune) conditions its UNet's cross-attention on the output of
LDM's ``FrozenOpenCLIPEmbedder(arch="ViT-H-14", layer="penultimate")``.  The released checkpoints carry the
text tower under ``cond_stage_model.model.`` (the vision tower was deleted before saving), so the
conditioning can be computed without any host application.  Layout (key names as in the released files)::

    token_embedding.weight                    (vocab, width)         vocab 49408 (CLIP BPE + SOT/EOT)
    positional_embedding                      (context, width)       context 77
    transformer.resblocks.{i}.ln_1            LayerNorm(width)       pre-norm residual block, i < layers
    transformer.resblocks.{i}.attn            in_proj_weight (3*width, width), in_proj_bias (3*width,),
                                              out_proj.{weight, bias}: nn.MultiheadAttention's layout
    transformer.resblocks.{i}.ln_2            LayerNorm(width)
    transformer.resblocks.{i}.mlp.c_fc        Linear(width -> mlp_width), exact (erf) GELU
    transformer.resblocks.{i}.mlp.c_proj      Linear(mlp_width -> width)
    ln_final                                  LayerNorm(width)
    text_projection, logit_scale              pooled-embedding head: not used by SD (ignored here)

ViT-H/14: width 1024, 16 heads of 64 channels, 24 blocks, MLP 4096; every LayerNorm has eps 1e-5.

What the conditioning is (``encode_with_transformer`` with ``layer_idx = 1``): token embeddings plus the
positional embedding, the first ``layers - 1`` residual blocks with a causal mask (token ``t`` attends to
tokens ``<= t``), then ``ln_final``; the last block is never run, so it is not loaded either.  The output is
the full (B, 77, width) sequence, not the pooled/projected CLIP embedding.

Tokens: OpenCLIP's ``tokenize`` gives ``[SOT, BPE tokens..., EOT]`` zero-padded to 77.  The empty prompt,
which StableSR samples with, is fixed (``[49406, 49407, 0, ...]``) and needs no tokenizer
(:func:`empty_prompt_tokens`).  Any other prompt needs the BPE vocabulary of the optional package
``open-clip-torch`` (:func:`tokenize`).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...descriptor import StateDict, check_layout, check_weights, count_indexed, shape_of
from ...errors import InvalidInputError, UnsupportedModelError

__all__ = [
    "CONTEXT_LENGTH",
    "EOT_TOKEN",
    "HEAD_WIDTH",
    "SOT_TOKEN",
    "TEXT_PREFIX",
    "CausalSelfAttention",
    "OpenCLIPTextTower",
    "ResidualAttentionBlock",
    "TextTowerConfig",
    "empty_prompt_tokens",
    "infer_text_config",
    "is_text_state_dict",
    "tokenize",
]

# Where an SD 2.x checkpoint (and a full StableSR one) keeps the text tower.
TEXT_PREFIX = "cond_stage_model.model."
# CLIP's BPE vocabulary: 49152 merges-derived tokens, then <start_of_text> and <end_of_text>.
SOT_TOKEN = 49406
EOT_TOKEN = 49407
CONTEXT_LENGTH = 77
# Every OpenCLIP text tower splits attention into heads of 64 channels (ViT-H: 1024 = 16 x 64).
HEAD_WIDTH = 64
_LN_EPS = 1e-5  # torch's LayerNorm default, which OpenCLIP's LayerNorm keeps
_WHAT = "OpenCLIP text tower"
_DETECT_SUFFIXES = ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.attn.in_proj_weight")
_BLOCK = "transformer.resblocks.{}."


@dataclass(frozen=True)
class TextTowerConfig:
    """Shape of an OpenCLIP text tower, as read from its tensors by :func:`infer_text_config`.

    Attributes:
        width: token feature size (1024 for ViT-H/14).
        layers: residual blocks in the checkpoint (24); the penultimate output runs ``layers - 1`` of them.
        heads: attention heads (``width // 64`` unless given).
        context_length: tokens per prompt (77).
        vocab_size: token ids accepted (49408).
        mlp_width: hidden size of each block's MLP (4 * width).
    """

    width: int
    layers: int
    heads: int
    context_length: int
    vocab_size: int
    mlp_width: int

    @property
    def used_layers(self) -> int:
        """Blocks that run: all but the last (``layer="penultimate"``)."""
        return self.layers - 1


def is_text_state_dict(state_dict: StateDict, prefix: str = TEXT_PREFIX) -> bool:
    """True when ``state_dict`` holds an OpenCLIP text tower under ``prefix``."""
    return all(prefix + s in state_dict for s in _DETECT_SUFFIXES)


def infer_text_config(state_dict: StateDict, prefix: str = TEXT_PREFIX, heads: int | None = None) -> TextTowerConfig:
    """Read the tower's configuration from tensor shapes.

    Args:
        state_dict: a full SD 2.x / StableSR checkpoint dict, or the tower's own keys with ``prefix=""``.
        prefix: where the tower's keys start.
        heads: attention heads; the shapes do not store it, and OpenCLIP's rule (64 channels a head) is
            used when it is None.

    Raises:
        UnsupportedModelError: a tensor the configuration is read from is missing or has the wrong rank,
            the widths disagree, or the width is no multiple of the head count.
    """
    vocab, width = shape_of(state_dict, prefix + "token_embedding.weight", _WHAT, ndim=2)
    context, pos_width = shape_of(state_dict, prefix + "positional_embedding", _WHAT, ndim=2)
    if pos_width != width:
        raise UnsupportedModelError(
            f"{_WHAT} tensor {prefix + 'positional_embedding'!r} has width {pos_width}, but "
            f"{prefix + 'token_embedding.weight'!r} has width {width}: not one text tower"
        )
    layers = count_indexed(state_dict, prefix + _BLOCK + "attn.in_proj_weight")
    # Blocks are counted up to the first gap; a later block means this one lost its attention weights, and
    # reading on would silently run a shallower tower (the penultimate block would be the wrong one).
    blocks = prefix + "transformer.resblocks."
    later = {int(i) for k in state_dict if k.startswith(blocks) and (i := k[len(blocks) :].split(".", 1)[0]).isdigit()}
    if any(i > layers for i in later) or (layers in later):
        missing = prefix + _BLOCK.format(layers) + "attn.in_proj_weight"
        raise UnsupportedModelError(f"{_WHAT} state dict lacks {missing!r} (blocks up to {max(later)} are present)")
    if layers < 2:
        first = prefix + _BLOCK.format(layers) + "attn.in_proj_weight"
        raise UnsupportedModelError(
            f"{_WHAT} state dict lacks {first!r}: the conditioning is the penultimate block's output, "
            f"so at least 2 residual blocks are needed (found {layers})"
        )
    mlp_width = shape_of(state_dict, prefix + _BLOCK.format(0) + "mlp.c_fc.weight", _WHAT, ndim=2)[0]
    if heads is None:
        if width % HEAD_WIDTH:
            raise UnsupportedModelError(
                f"{_WHAT} width {width} is no multiple of OpenCLIP's head width {HEAD_WIDTH}; give heads explicitly"
            )
        heads = width // HEAD_WIDTH
    elif heads < 1 or width % heads:
        raise UnsupportedModelError(f"{_WHAT} width {width} cannot be split into {heads} attention heads")
    return TextTowerConfig(
        width=width, layers=layers, heads=heads, context_length=context, vocab_size=vocab, mlp_width=mlp_width
    )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask, in ``nn.MultiheadAttention``'s parameter layout.

    Parameters are stored as the checkpoint has them (``in_proj_weight`` stacks the q, k, v projections
    row-wise), so the file's tensors load without renaming; the computation is written out so that it does
    not depend on ``nn.MultiheadAttention``'s sequence-first/batch-first conventions, which OpenCLIP changed
    between versions.

    Shape:
        (B, L, width) -> (B, L, width).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3C): [q | k | v] along channels
        # (B, L, 3, H, C/H) -> 3 x (B, H, L, C/H): heads split each projection into contiguous channel groups.
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        # is_causal is the additive mask OpenCLIP builds (-inf strictly above the diagonal): with it the
        # result at token t does not depend on later tokens, in particular not on the padding after EOT.
        # Scale 1/sqrt(C/H), as nn.MultiheadAttention.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, C/H)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Shape:
        (B, L, width) -> (B, L, width).
    """

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=_LN_EPS)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=_LN_EPS)
        # Named c_fc / gelu / c_proj as the checkpoint's ``mlp.c_fc.*`` / ``mlp.c_proj.*``; ViT-H uses the
        # exact (erf) GELU, not OpenAI CLIP's QuickGELU.
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Blocks(nn.Module):
    """Holds the blocks under ``resblocks`` so that module paths equal the checkpoint's ``transformer.resblocks.i``."""

    def __init__(self, blocks: list[ResidualAttentionBlock]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)


class OpenCLIPTextTower(nn.Module):
    """The SD 2.x prompt encoder: OpenCLIP text tower up to its penultimate block, then ``ln_final``.

    Only the blocks that run are built (``config.layers - 1``): the last block's weights, the text projection
    and the logit scale are in the checkpoint but never affect the conditioning.  Build it from a checkpoint
    with :meth:`from_state_dict`.

    Args:
        config: the tower's shape (:func:`infer_text_config`).

    Shape:
        tokens (B, context_length) int64 -> context (B, context_length, width), the UNet's cross-attention
        input (B, 77, 1024) for SD 2.x.
    """

    def __init__(self, config: TextTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = _Blocks(
            [ResidualAttentionBlock(config.width, config.heads, config.mlp_width) for _ in range(config.used_layers)]
        )
        self.ln_final = nn.LayerNorm(config.width, eps=_LN_EPS)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: StateDict,
        prefix: str = TEXT_PREFIX,
        *,
        heads: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> OpenCLIPTextTower:
        """Build the tower from a checkpoint's tensors, checking every tensor it uses.

        Args:
            state_dict: a full SD 2.x / StableSR checkpoint dict (wrapper removed); keys outside the tower,
                the vision tower (``visual.*``), ``text_projection``, ``logit_scale`` and the last block
                are ignored.
            prefix: where the tower's keys start (``""`` for a bare tower).
            heads: see :func:`infer_text_config`.
            dtype: the floating type the module computes in (weights are converted to it).

        Raises:
            UnsupportedModelError: a missing tensor, one of another shape (the message names the file key),
                or an unknown tensor inside the blocks that run (e.g. LayerScale weights of another tower).
            CheckpointError: weights that are NaN/inf or not floating point (:func:`check_weights`).
        """
        config = infer_text_config(state_dict, prefix, heads)
        # Built on the meta device and filled by assignment: no random init of 340 M weights to throw away.
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        last = prefix + _BLOCK.format(config.layers - 1)
        blocks = prefix + "transformer."
        unexpected = [
            k
            for k in state_dict
            if k.startswith(blocks) and not k.startswith(last) and k[len(prefix) :] not in expected
        ]
        layout = f"width {config.width}, {config.layers} blocks, {config.heads} heads, context {config.context_length}"
        check_layout(_WHAT, layout, {prefix + k: v for k, v in expected.items()}, state_dict, unexpected)
        given = {k: state_dict[prefix + k] for k in expected}
        check_weights(_WHAT, expected, given, file_key=lambda k: prefix + k)
        model.load_state_dict({k: v.to(dtype) for k, v in given.items()}, strict=True, assign=True)
        return model.requires_grad_(False).eval()

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, context_length) token ids -> (B, context_length, width) conditioning."""
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] != cfg.context_length:
            raise InvalidInputError(
                f"{_WHAT} takes token ids of shape (B, {cfg.context_length}), got {tuple(tokens.shape)}"
            )
        if tokens.dtype not in (torch.int64, torch.int32):
            raise InvalidInputError(f"{_WHAT} takes int64 token ids, got {tokens.dtype}")
        # nn.Embedding would fail with an IndexError (or a device assert on CUDA) on an id out of range.
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise InvalidInputError(
                f"{_WHAT} token ids must lie in [0, {cfg.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        x = self.token_embedding(tokens.to(self.positional_embedding.device)) + self.positional_embedding
        for block in self.transformer.resblocks:  # the first layers - 1 blocks: the penultimate output
            x = block(x)
        return self.ln_final(x)

    def encode(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> (B, context_length, width) conditioning; see :func:`tokenize` for what needs open_clip."""
        return self(tokenize(prompts, self.config.context_length))


def empty_prompt_tokens(
    batch: int = 1, context_length: int = CONTEXT_LENGTH, device: torch.device | str | None = None
) -> Tensor:
    """The tokens of ``""``: ``[SOT, EOT, 0, ..., 0]`` per row, (batch, context_length) int64.

    This is exactly what OpenCLIP's tokenizer returns for the empty (or all-whitespace) prompt, so the
    unconditional / default StableSR context needs no tokenizer.
    """
    if batch < 0 or context_length < 2:
        raise InvalidInputError(
            f"empty-prompt tokens need batch >= 0 and context_length >= 2, got {batch}, {context_length}"
        )
    tokens = torch.zeros(batch, context_length, dtype=torch.int64, device=device)
    tokens[:, 0] = SOT_TOKEN
    tokens[:, 1] = EOT_TOKEN
    return tokens


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> Tensor:
    """Prompts -> (B, context_length) int64 tokens, as ``open_clip.tokenize`` makes them.

    Empty and all-whitespace prompts are answered without a tokenizer (:func:`empty_prompt_tokens`).  Any
    other prompt needs the CLIP BPE vocabulary shipped by the optional package ``open-clip-torch``; a prompt
    longer than the context is cut, with EOT kept as the last token (OpenCLIP's rule).

    Raises:
        InvalidInputError: a prompt that is not a string, or a non-empty prompt while open-clip-torch is not
            installed (the message says how to install it).
    """
    items = [texts] if isinstance(texts, str) else list(texts)
    bad = [type(t).__name__ for t in items if not isinstance(t, str)]
    if bad:
        raise InvalidInputError(f"prompts must be strings, got {', '.join(sorted(set(bad)))}")
    if all(not t.strip() for t in items):
        return empty_prompt_tokens(len(items), context_length)
    tokens = _open_clip_tokenize()(items, context_length=context_length)
    return tokens.to(torch.int64)


@lru_cache(maxsize=1)
def _open_clip_tokenize() -> Callable[..., Tensor]:
    """open_clip's ``tokenize``, without importing the open_clip package when it is not yet imported.

    ``import open_clip`` runs the package's ``__init__``, which imports torchvision and timm for the image
    towers; the core must not import those.  Its ``tokenizer.py`` needs only ftfy, regex, numpy and torch (and
    finds its BPE vocabulary beside itself), so it is loaded on its own, under a private module name.
    """
    loaded = sys.modules.get("open_clip")
    if loaded is not None and hasattr(loaded, "tokenize"):
        return loaded.tokenize
    hint = "pip install open-clip-torch (the empty prompt needs nothing)"
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise InvalidInputError(
            f"a text prompt needs the OpenCLIP tokenizer, and the package open_clip is not installed: {hint}"
        )
    source = next(
        (
            Path(p) / "tokenizer.py"
            for p in (spec.submodule_search_locations or [])
            if (Path(p) / "tokenizer.py").is_file()
        ),
        None,
    )
    try:
        if source is None:
            raise ImportError("the package has no tokenizer.py")
        mod_spec = importlib.util.spec_from_file_location("realsr_core._open_clip_tokenizer", source)
        if mod_spec is None or mod_spec.loader is None:
            raise ImportError(f"{source} cannot be loaded")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module.tokenize
    except Exception as e:  # a missing dependency (ftfy, regex) or a layout this code does not know
        raise InvalidInputError(
            f"a text prompt needs the OpenCLIP tokenizer, and the installed open_clip's could not be loaded "
            f"({type(e).__name__}: {e}); reinstall it: {hint}"
        ) from e
