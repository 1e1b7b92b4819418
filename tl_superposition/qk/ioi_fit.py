"""How well a QK transcoder holds on IOI prompts: the error term of END firings, and the
spliced pattern's attention on END -> IO and END -> S2.

A dictionary can reproduce the attention pattern on the text it was trained on and still miss
the prompts a researcher opens it for. For the heads of interest of ``qkt``'s layer, on IOI
prompts (a held-out prompt seed), :func:`ioi_fit` measures

- the **error share** of END firings: for every (prompt, head, source) with the true pattern
  at END at least ``pattern_thresh`` (source position 0 left out, as the trace leaves it out),
  ``|score - score_hat|`` and ``|score|`` (``hook_attn_scores`` against the score from the
  reconstructed query and key); ``error_frac`` is ``mean |error| / mean |score|``, and
  ``error_frac_q`` / ``error_frac_k`` the same with only the query (key) reconstructed, the
  other side true, which says which dictionary misses;
- the **spliced attention** on END -> IO and END -> S2: the pattern with both the queries and
  the keys of the layer replaced by their reconstructions, against the true one, as means over
  prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.activations.batches import run_hooks
from tl_superposition.ioi import IOIDataset
from tl_superposition.qk.attention import attention_scores, layer_attention
from tl_superposition.qk.transcoder import QKTranscoder


@dataclass
class IOIFit:
    """What :func:`ioi_fit` measured.

    Attributes:
        heads: one row per head: layer, head, n_firings (END firings), error_frac,
            error_frac_q, error_frac_k, attn_end_io_true, attn_end_io_spliced,
            attn_end_s2_true, attn_end_s2_spliced.
        firings: one row per END firing: layer, prompt, head, src, role (``IO``, ``S2``,
            ``S1`` or ``other``), pattern, score, score_hat, error, error_q (score minus the
            score of the reconstructed query and the true key), error_k (true query,
            reconstructed key).

    The fits of several layers join into one with :meth:`concat`.
    """

    heads: pd.DataFrame
    firings: pd.DataFrame

    def summary(self) -> dict[str, float]:
        """Over every head: error_frac (``mean |error| / mean |score|`` of all END firings),
        the same with only queries (``_q``) or only keys (``_k``) reconstructed, the mean true
        and spliced attention on END -> IO and END -> S2."""
        h = self.heads
        return {
            "error_frac_ioi": error_share(self.firings),
            "error_frac_ioi_q": error_share(self.firings, "error_q"),
            "error_frac_ioi_k": error_share(self.firings, "error_k"),
            "n_firings": int(len(self.firings)),
            **{str(k): float(h[k].to_numpy().mean()) for k in h.columns if k.startswith("attn_")},
        }

    @classmethod
    def concat(cls, fits: Sequence[IOIFit]) -> IOIFit:
        """One fit of the heads of several fits (of several layers)."""
        return cls(
            heads=pd.concat([f.heads for f in fits], ignore_index=True),
            firings=pd.concat([f.firings for f in fits], ignore_index=True),
        )

    def by_role(self) -> dict[str, float]:
        """The error share of the END firings onto each source role (IO, S1, S2, other)."""
        return {str(role): error_share(f) for role, f in self.firings.groupby("role")}


def _heads_of(
    qkt: QKTranscoder, model: HookedTransformer, heads: Sequence[int] | None
) -> tuple[list[int], Any]:
    """The heads to measure (default every head) and the layer's attention module.

    Raises:
        ValueError: ``qkt`` does not fit ``model``, or a head out of range.
    """
    qkt.check_model(model)
    n = qkt.shape.n_heads
    out = list(range(n)) if heads is None else [int(h) for h in heads]
    if any(not 0 <= h < n for h in out):
        raise ValueError(f"heads must be in 0..{n - 1}, got {out}")
    return out, layer_attention(model, qkt.shape.layer)


def error_share(firings: pd.DataFrame, column: str = "error") -> float:
    """``mean |column| / mean |score|`` of END firings (NaN for none)."""
    if not len(firings):
        return float("nan")
    err = np.abs(firings[column].to_numpy(dtype=float)).mean()
    return float(err / np.abs(firings.score.to_numpy(dtype=float)).mean())


@torch.no_grad()
def ioi_fit(
    qkt: QKTranscoder,
    model: HookedTransformer,
    dataset: IOIDataset,
    heads: Sequence[int] | None = None,
    pattern_thresh: float = 0.5,
    batch_size: int = 32,
) -> IOIFit:
    """Measure ``qkt`` on IOI prompts (module docstring).

    Args:
        qkt: the QK transcoder of one layer.
        model: its model.
        dataset: IOI prompts (held out from whatever chose the heads).
        heads: query heads of the layer (default: every head).
        pattern_thresh: an END firing has true attention at least this.
        batch_size: prompts per forward pass.

    Raises:
        ValueError: ``qkt`` does not fit ``model``, or a head out of range.
    """
    s = qkt.shape
    heads, attn_module = _heads_of(qkt, model, heads)
    hooks = ("ln1.hook_normalized", "attn.hook_attn_scores", "attn.hook_q", "attn.hook_k")
    names = {s.hook(h) for h in hooks}
    dev = next(model.parameters()).device
    firings: list[pd.DataFrame] = []
    attn: dict[str, list[torch.Tensor]] = {
        f"attn_end_{role}_{kind}": [] for role in ("io", "s2") for kind in ("true", "spliced")
    }
    for lo in range(0, len(dataset), batch_size):
        part = dataset[lo : lo + batch_size]
        cache = run_hooks(model, part.tokens.to(dev), sorted(names))
        true = cache[s.hook("attn.hook_attn_scores")][:, heads].double()
        out = qkt(cache[s.hook("ln1.hook_normalized")].float())
        q, k = cache[s.hook("attn.hook_q")].float(), cache[s.hook("attn.hook_k")].float()
        b = torch.arange(len(part))
        end = part.end_pos.to(dev)
        score = true[b, :, end]  # [batch, head, src]
        score_hat, score_q, score_k = (
            attention_scores(attn_module, qq, kk)[:, heads].double()[b, :, end]
            for qq, kk in ((out.q, out.k), (out.q, k), (q, out.k))
        )
        p_true, p_rec = score.softmax(-1), score_hat.softmax(-1)
        for role, pos in (("io", part.io_pos), ("s2", part.s2_pos)):  # [batch, head] each
            attn[f"attn_end_{role}_true"].append(p_true[b, :, pos].cpu())
            attn[f"attn_end_{role}_spliced"].append(p_rec[b, :, pos].cpu())
        firings.append(
            _end_firings(part, lo, heads, score, (score_hat, score_q, score_k), p_true,
                         pattern_thresh)
        )  # fmt: skip
    f = pd.concat(firings, ignore_index=True)
    f.insert(0, "layer", s.layer)
    of_head = [pd.DataFrame(f[f["head"].to_numpy() == h]) for h in heads]
    table = pd.DataFrame(
        {
            "layer": s.layer,
            "head": heads,
            "n_firings": [len(mine) for mine in of_head],
            "error_frac": [error_share(mine) for mine in of_head],
            "error_frac_q": [error_share(mine, "error_q") for mine in of_head],
            "error_frac_k": [error_share(mine, "error_k") for mine in of_head],
            **{k: torch.cat(v).mean(0).numpy() for k, v in attn.items()},
        }
    )
    return IOIFit(heads=table, firings=f)


def _end_firings(part, lo, heads, score, recon, p_true, thresh) -> pd.DataFrame:
    """One row per END firing of a batch (module docstring)."""
    fire = p_true >= thresh
    fire[..., 0] = False
    b, i, src = fire.nonzero(as_tuple=True)
    b_cpu, src_cpu = b.cpu(), src.cpu()
    role = []
    for bb, ss in zip(b_cpu.tolist(), src_cpu.tolist()):
        named = {int(part.io_pos[bb]): "IO", int(part.s2_pos[bb]): "S2", int(part.s1_pos[bb]): "S1"}
        role.append(named.get(ss, "other"))
    sc = score[b, i, src].cpu()
    sh, sq, sk = (r[b, i, src].cpu() for r in recon)
    return pd.DataFrame(
        {
            "prompt": (b_cpu + lo).numpy(),
            "head": torch.tensor(heads)[i.cpu()].numpy(),
            "src": src_cpu.numpy(),
            "role": role,
            "pattern": p_true[b, i, src].cpu().numpy(),
            "score": sc.numpy(),
            "score_hat": sh.numpy(),
            "error": (sc - sh).numpy(),
            "error_q": (sc - sq).numpy(),
            "error_k": (sc - sk).numpy(),
        }
    )


@torch.no_grad()
def text_error_share(
    qkt: QKTranscoder,
    model: HookedTransformer,
    tokens: Int[Tensor, "n_contexts ctx"],
    heads: Sequence[int] | None = None,
    pattern_thresh: float = 0.5,
    batch_size: int = 16,
) -> float:
    """The error share of the heads' firings on text, the counterpart of
    :meth:`IOIFit.summary`'s ``error_frac_ioi``: over every (context, head, destination,
    source) with true attention at least ``pattern_thresh`` and source after position 0,
    ``mean |score - score_hat| / mean |score|``. Set beside the IOI figure it says whether a
    dictionary misses IOI prompts in particular or the heads' firings in general.

    Raises:
        ValueError: ``qkt`` does not fit ``model``, or a head out of range.
    """
    s = qkt.shape
    heads, attn_module = _heads_of(qkt, model, heads)
    names = {s.hook("ln1.hook_normalized"), s.hook("attn.hook_attn_scores")}
    err, size = 0.0, 0.0
    for lo in range(0, tokens.shape[0], batch_size):
        cache = run_hooks(model, tokens[lo : lo + batch_size].to(model.cfg.device), sorted(names))
        true = cache[s.hook("attn.hook_attn_scores")][:, heads].double()
        out = qkt(cache[s.hook("ln1.hook_normalized")].float())
        rec = attention_scores(attn_module, out.q, out.k)[:, heads].double()
        fire = true.softmax(-1) >= pattern_thresh
        fire[..., 0] = False
        err += float((true - rec)[fire].abs().sum())
        size += float(true[fire].abs().sum())
    return err / size if size else float("nan")
