"""Forward hooks that replace a layer's queries, keys or pattern: splicing into a model.

:meth:`QKTranscoder.splice` and the baselines of :mod:`.evaluate` use these hooks with
TransformerLens's ``model.hooks(fwd_hooks=...)`` context manager, so that any TransformerLens
code (``run_with_cache``, losses, logit differences, this project's trace) runs with the
replacement in place and the model is unchanged afterwards.

- Without ``heads``: ``attn.hook_q`` / ``attn.hook_k`` are replaced (all heads); the model's
  own rotary embedding, scale and mask then act on the new values.
- With ``heads``: only those query heads' rows of ``attn.hook_attn_scores`` are replaced by
  scores computed (by the model's own code, :func:`.attention.attention_scores`) from the new
  queries and keys. Keys are shared by a group of query heads under grouped-query attention;
  this way the other heads of the group keep their true keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_superposition.core.splicing import Hooks, Replacement, replacement_hooks
from tl_superposition.qk.attention import attention_scores, causal_mask, layer_attention
from tl_superposition.qk.config import AttentionShape

#: ``f(x, true_value) -> new value``: x is ``ln1.hook_normalized`` of the same forward pass.


def check_heads(heads: Sequence[int] | None, n_heads: int) -> list[int] | None:
    """``heads`` as a list of ints, or ``None``.

    Raises:
        ValueError: an empty list or a head outside ``0..n_heads-1``.
    """
    if heads is None:
        return None
    out = [int(h) for h in heads]
    if not out or any(not 0 <= h < n_heads for h in out):
        raise ValueError(f"heads must be a non-empty subset of 0..{n_heads - 1}, got {heads}")
    return out


def qk_hooks(
    model: HookedTransformer,
    shape: AttentionShape,
    new_q: Replacement | None,
    new_k: Replacement | None,
    heads: Sequence[int] | None = None,
) -> Hooks:
    """Hooks replacing the queries (``new_q``) and/or keys (``new_k``) of ``shape.layer``.

    Args:
        new_q, new_k: replacement functions, or ``None`` to keep the true values.
        heads: restrict the replacement to these query heads (see the module docstring).

    Raises:
        ValueError: a head out of range.
    """
    heads = check_heads(heads, shape.n_heads)
    state: dict[str, Tensor] = {}
    if heads is None:
        swaps = {"attn.hook_q": new_q, "attn.hook_k": new_k}
        fns = {name: fn for name, fn in swaps.items() if fn is not None}
        return replacement_hooks(shape.layer, "ln1.hook_normalized", fns, stash=state)

    attn = layer_attention(model, shape.layer)
    idx = torch.tensor(heads, dtype=torch.long)

    def keep(name: str, fn: Replacement | None) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook_fn(value: Tensor, hook: HookPoint) -> Tensor:
            del hook
            state[name] = value if fn is None else fn(state["x"], value).to(value.dtype)
            return value

        return hook_fn

    def replace_scores(scores: Tensor, hook: HookPoint) -> Tensor:
        del hook
        if state["q"].shape[1] != scores.shape[-1]:
            raise ValueError("head-restricted splicing does not support a key/value cache")
        new = attention_scores(attn, state["q"], state["k"]).to(scores.dtype)
        out = scores.clone()
        h = idx.to(scores.device)
        out[:, h] = new[:, h]
        return out

    hooks = replacement_hooks(shape.layer, "ln1.hook_normalized", {}, stash=state)
    hooks += [
        (shape.hook("attn.hook_q"), keep("q", new_q)),
        (shape.hook("attn.hook_k"), keep("k", new_k)),
        (shape.hook("attn.hook_attn_scores"), replace_scores),
    ]
    return hooks


def uniform_pattern_hooks(shape: AttentionShape, heads: Sequence[int] | None = None) -> Hooks:
    """Hooks giving ``shape.layer``'s heads (all, or ``heads``) the uniform causal pattern.

    Query row ``i`` attends ``1 / (i + 1)`` to each key ``0..i``: the uniform baseline.
    """
    heads = check_heads(heads, shape.n_heads)

    def replace(pattern: Tensor, hook: HookPoint) -> Tensor:
        del hook
        n = pattern.shape[-1]
        mask = causal_mask(n, pattern.device).to(pattern.dtype)
        uniform = mask / mask.sum(-1, keepdim=True)
        out = pattern.clone()
        if heads is None:
            out[:] = uniform
        else:
            out[:, torch.tensor(heads, device=pattern.device)] = uniform
        return out

    return [(shape.hook("attn.hook_pattern"), replace)]
