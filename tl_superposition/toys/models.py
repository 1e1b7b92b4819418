"""Toy models: attention-only ``HookedTransformer``s with one-hot embedding and unembedding.

The toy model of the attention-head-superposition write-ups: no MLP, no LayerNorm, no
positional information, ``d_model = d_vocab`` with the identity as embedding and unembedding,
``d_head = 1``. Only the attention weights (``W_Q, W_K, W_V, W_O`` and ``b_Q, b_K, b_V``) train;
the embedding, unembedding, positional embedding and ``b_O`` are fixed (identity or zero) and
frozen. ``use_attn_result`` is on, so ``blocks.L.attn.hook_result`` holds every head's output
``[batch, pos, n_heads, d_model]``, which the ablation analysis needs.

Besides trained models there are two hand-built ones, used to test the analysis:

- :func:`superposed_skip_trigram_model` -- two heads encode three skip trigrams, the middle one
  only through both heads together (attention-head superposition by construction);
- :func:`monosemantic_skip_trigram_model` -- one head per trigram;
- :func:`overlap_copy_model` -- three heads solve the three copy tasks of
  :func:`~tl_superposition.toys.datasets.overlap_copy_dataset` as overlapping pairs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.reading import read_json, reading
from tl_superposition.toys.datasets import overlap_copy_vocab, skip_trigram_vocab

#: The trainable parameter names of a toy model's attention (per layer).
TRAINABLE = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


def toy_model_config(
    n_heads: int, d_vocab: int, n_layers: int = 1, n_ctx: int = 32, d_head: int = 1
) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` of a toy model.

    Args:
        n_heads: heads per layer.
        d_vocab: vocabulary size, also ``d_model`` (one-hot residual stream).
        n_layers: attention layers.
        n_ctx: longest sequence the model accepts.
        d_head: head dimension (1 in every published toy setting).

    Raises:
        ValueError: a count below 1.
    """
    if min(n_heads, d_vocab, n_layers, n_ctx, d_head) < 1:
        raise ValueError("n_heads, d_vocab, n_layers, n_ctx and d_head must all be >= 1")
    return HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_vocab,
        n_ctx=n_ctx,
        d_head=d_head,
        n_heads=n_heads,
        d_vocab=d_vocab,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type="standard",
        use_attn_result=True,
        default_prepend_bos=False,
        model_name=f"toy-{n_layers}L{n_heads}H-v{d_vocab}",
    )


def make_toy_model(
    n_heads: int,
    d_vocab: int,
    n_layers: int = 1,
    n_ctx: int = 32,
    seed: int = 0,
    d_head: int = 1,
) -> HookedTransformer:
    """A fresh toy model: identity embedding/unembedding, Xavier-normal attention weights.

    ``W_Q, W_K, W_V, W_O`` are drawn with ``torch.nn.init.xavier_normal_`` (as in
    cmathw/gated-attn) from a ``torch.Generator`` seeded with ``seed``; ``b_Q, b_K, b_V`` start
    at zero. The global torch random state is left untouched.

    Returns:
        A ``HookedTransformer`` in train mode whose only trainable parameters are the
        attention weights of :data:`TRAINABLE`.
    """
    cfg = toy_model_config(n_heads, d_vocab, n_layers, n_ctx, d_head)
    with torch.random.fork_rng(devices=[]):
        model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.embed.W_E.copy_(torch.eye(d_vocab))
        model.unembed.W_U.copy_(torch.eye(d_vocab))
        model.unembed.b_U.zero_()
        model.pos_embed.W_pos.zero_()
        for block in model.blocks:
            attn = block.attn
            for name in ("W_Q", "W_K", "W_V", "W_O"):
                torch.nn.init.xavier_normal_(getattr(attn, name), generator=g)
            for name in ("b_Q", "b_K", "b_V", "b_O"):
                getattr(attn, name).zero_()
    freeze_fixed_weights(model)
    return model


def freeze_fixed_weights(model: HookedTransformer) -> None:
    """Leave only the attention weights of :data:`TRAINABLE` trainable."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[-1] in TRAINABLE and ".attn." in name)


def _set_head(model: HookedTransformer, layer: int, head: int, **weights: dict[int, float]) -> None:
    """Write sparse per-token entries of one head (``d_head = 1``): W_Q/W_K/W_V rows, W_O cols."""
    attn = model.blocks[layer].attn
    with torch.no_grad():
        for name, entries in weights.items():
            w = getattr(attn, name)
            for tok, val in entries.items():
                if name == "W_O":
                    w[head, 0, tok] = val
                else:
                    w[head, tok, 0] = val


def _blank_model(n_heads: int, d_vocab: int, n_ctx: int = 32) -> HookedTransformer:
    model = make_toy_model(n_heads, d_vocab, n_ctx=n_ctx)
    with torch.no_grad():
        for name in TRAINABLE:
            getattr(model.blocks[0].attn, name).zero_()
    return model.eval()


def superposed_skip_trigram_model(
    scale: float = 10.0, sharpness: float = 12.0
) -> HookedTransformer:
    """A hand-built 2-head model for 3 skip trigrams in attention-head superposition.

    Both heads read the A token (value 1; every other token has value 0) and write along
    their own direction; the C logits read the two heads as ``C1: (1, 0)``, ``C2: (0.75,
    0.75)``, ``C3: (0, 1)``. Head 0 attends to A from B1 and B2, head 1 from B2 and B3. So
    trigram 1 is carried by head 0 alone, trigram 3 by head 1 alone, and trigram 2 needs both
    heads (their outputs add up to C2's direction): the check of
    :func:`tl_superposition.toys.check.solely_encoded` must fail for it.

    Args:
        scale: size of a head's write (logits), well above the residual's 1 on B.
        sharpness: query-key score of an attended A (attention on A near 1).
    """
    v = skip_trigram_vocab(3)
    model = _blank_model(2, v["d_vocab"])
    b1, b2, b3 = v["B"]
    c1, c2, c3 = v["C"]
    a = v["A"]
    _set_head(
        model,
        0,
        0,
        W_Q={b1: 1.0, b2: 1.0, b3: -1.0},
        W_K={a: sharpness},
        W_V={a: 1.0},
        W_O={c1: scale, c2: 0.75 * scale},
    )
    _set_head(
        model,
        0,
        1,
        W_Q={b1: -1.0, b2: 1.0, b3: 1.0},
        W_K={a: sharpness},
        W_V={a: 1.0},
        W_O={c3: scale, c2: 0.75 * scale},
    )
    return model


def monosemantic_skip_trigram_model(
    n_trigrams: int = 3, scale: float = 10.0, sharpness: float = 12.0
) -> HookedTransformer:
    """A hand-built model with one head per skip trigram (no superposition).

    Head ``t`` attends to A only from ``B_t`` and writes ``scale`` on ``C_t``; from any other
    query its attention to A is near 0 and it writes near nothing (every non-A token has
    value 0).
    """
    v = skip_trigram_vocab(n_trigrams)
    model = _blank_model(n_trigrams, v["d_vocab"])
    for t, (b, c) in enumerate(zip(v["B"], v["C"])):
        query = {bb: (1.0 if bb == b else -1.0) for bb in v["B"]}
        _set_head(
            model,
            0,
            t,
            W_Q=query,
            W_K={v["A"]: sharpness},
            W_V={v["A"]: 1.0},
            W_O={c: scale},
        )
    return model


def overlap_copy_model(scale: float = 3.0, sharpness: float = 12.0) -> HookedTransformer:
    """Three heads solving the three copy tasks of ``overlap_copy_dataset`` as pairs.

    Head ``h`` serves task ``h`` and task ``h - 1`` (mod 3): task 0 uses heads 0 and 1,
    task 1 heads 1 and 2, task 2 heads 2 and 0 (the overlapping pairs of METHODS section 2).
    Within a task the two heads carry the two coordinates of the content tokens' directions
    at 90, 210 and 330 degrees (value and output weights alike), so the pair maps each content
    token back onto itself; one head alone cannot. Head ``h`` takes the first coordinate in
    task ``h`` and the second in task ``h - 1``, which keeps its spill-over into the other
    task's logits below the correct logit (``scale`` against at most ``0.87 scale``; the
    trigger's own residual logit is 1). ``scale = 3`` gives attention outputs of the size the
    trained skip-trigram toys have (mean square 0.21 against about 0.27).
    """
    v = overlap_copy_vocab(3, 3, 6)
    model = _blank_model(3, v["d_vocab"])
    angles = [math.radians(a) for a in (90.0, 210.0, 330.0)]
    coords = [[math.cos(a) for a in angles], [math.sin(a) for a in angles]]
    content_all = [tok for group in v["content"] for tok in group]
    for h in range(3):
        roles = {h: 0, (h - 1) % 3: 1}  # task -> coordinate this head carries
        w_q = {trig: (1.0 if t in roles else -1.0) for t, trig in enumerate(v["trigger"])}
        w_v: dict[int, float] = {}
        w_o: dict[int, float] = {}
        for t, coord in roles.items():
            for j, tok in enumerate(v["content"][t]):
                w_v[tok] = coords[coord][j]
                w_o[tok] = scale * coords[coord][j]
        _set_head(
            model,
            0,
            h,
            W_Q=w_q,
            W_K={tok: sharpness for tok in content_all},
            W_V=w_v,
            W_O=w_o,
        )
    return model


# --------------------------------------------------------------------------- save / load

TOY_CONFIG_FILE = "toy_config.json"
TOY_WEIGHTS_FILE = "toy_weights.safetensors"


def save_toy_model(model: HookedTransformer, path: str | os.PathLike) -> Path:
    """Write a toy model's shape (``toy_config.json``) and weights (safetensors) to folder ``path``.

    Both files are written atomically. Returns the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    shape = {
        "n_heads": cfg.n_heads,
        "d_vocab": cfg.d_vocab,
        "n_layers": cfg.n_layers,
        "n_ctx": cfg.n_ctx,
        "d_head": cfg.d_head,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path / TOY_WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(path / TOY_CONFIG_FILE, shape)
    return path


def load_toy_model(path: str | os.PathLike) -> HookedTransformer:
    """Load a toy model written by :func:`save_toy_model` (in eval mode).

    Raises:
        FileNotFoundError: the folder lacks the files.
        ValueError: the weights do not fit the recorded shape.
    """
    path = Path(path)
    for name in (TOY_CONFIG_FILE, TOY_WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} holds no {name}: not a saved toy model")
    shape = read_json(path / TOY_CONFIG_FILE)
    model = make_toy_model(**shape)
    with reading(path / TOY_WEIGHTS_FILE):
        state = load_file(str(path / TOY_WEIGHTS_FILE))
    own = model.state_dict()
    bad = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    if bad or set(state) - set(own):
        raise ValueError(f"{path}: weights do not fit a toy model of shape {shape} ({bad[:5]})")
    model.load_state_dict(state)
    return model.eval()
