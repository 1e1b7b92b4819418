"""QK attribution of one attention score to (query feature, key feature) pairs.

With ``q_hat = sum_i fQ_i WQ_i + bQ`` at the destination ``d`` and ``k_hat = sum_j fK_j WK_j +
bK`` at the source ``s`` (head ``h``'s slices of the decoders; under grouped-query attention the
key rows of ``h``'s key/value head), and ``R_p`` the model's rotary rotation at position ``p``
(the identity without RoPE), the reconstructed score splits exactly into::

    score_hat = sum_ij fQ_i fK_j <R_d WQ_i, R_s WK_j> / scale      pair terms
              + sum_i  fQ_i <R_d WQ_i, R_s bK> / scale              query feature x key bias
              + sum_j  fK_j <R_d bQ, R_s WK_j> / scale              query bias x key feature
              + <R_d bQ, R_s bK> / scale                             bias x bias

and the model's own score (``hook_attn_scores``) is ``score_hat + error``. Terms are computed in
float64, so the table sums to the model's score to float32 rounding of that score.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.activations.batches import run_hooks
from tl_superposition.qk.attention import layer_attention, rotate
from tl_superposition.qk.transcoder import QKTranscoder


@dataclass
class ScoreAttribution:
    """The decomposition of one attention score.

    Attributes:
        terms: one row per term: ``kind`` (``pair``, ``q_feature x k_bias``,
            ``q_bias x k_feature``, ``bias x bias``, ``error``), ``q_feature`` and
            ``k_feature`` (-1 where none), ``q_act`` and ``k_act`` (feature activations,
            NaN where none), ``value`` (score units); sorted by ``|value|``, largest first.
        score: the model's ``hook_attn_scores`` value.
        reconstructed: the score from the reconstructions (the sum of all terms but ``error``).
        layer, head, dest, src: what was decomposed.
    """

    terms: pd.DataFrame
    score: float
    reconstructed: float
    layer: int
    head: int
    dest: int
    src: int

    @property
    def error(self) -> float:
        """``score - reconstructed``."""
        return self.score - self.reconstructed

    def by_kind(self) -> pd.Series:
        """The total of each kind of term."""
        totals = self.terms.groupby("kind")["value"].sum()
        assert isinstance(totals, pd.Series)
        return totals


def rotate_at(model: HookedTransformer, layer: int, v: Tensor, pos: int) -> Tensor:
    """Rotate vectors ``v`` (``[m, d_head]``) as the layer rotates a query/key at position ``pos``.

    The identity for models without rotary embeddings.
    """
    attn = layer_attention(model, layer)
    x = torch.zeros(1, pos + 1, v.shape[0], v.shape[1], dtype=v.dtype, device=v.device)
    x[0, pos] = v
    return rotate(attn, x)[0, pos]


@torch.no_grad()
def attribute_score(
    qkt: QKTranscoder,
    model: HookedTransformer,
    tokens: Tensor,
    head: int,
    dest: int,
    src: int,
) -> ScoreAttribution:
    """Split head ``head``'s score from ``dest`` to ``src`` on one prompt into feature pairs.

    Args:
        qkt: the QK transcoder of the layer.
        model: its model.
        tokens: one prompt, int64 ``[pos]`` or ``[1, pos]``.
        head: query head of ``qkt``'s layer.
        dest, src: destination (query) and source (key) positions, ``0 <= src <= dest``.

    Returns:
        A :class:`ScoreAttribution` whose ``terms`` sum to the model's ``hook_attn_scores``
        value at ``[0, head, dest, src]``.

    Raises:
        ValueError: ``qkt`` does not fit ``model``, or a head or position is out of range.
    """
    qkt.check_model(model)
    s = qkt.shape
    tokens = tokens.reshape(1, -1).to(model.cfg.device)
    n = tokens.shape[1]
    if not 0 <= head < s.n_heads:
        raise ValueError(f"head must be in 0..{s.n_heads - 1}, got {head}")
    if not 0 <= src <= dest < n:
        raise ValueError(f"need 0 <= src <= dest < {n} (causal), got dest={dest}, src={src}")
    names = {s.hook("ln1.hook_normalized"), s.hook("attn.hook_attn_scores")}
    cache = run_hooks(model, tokens, sorted(names))
    score = float(cache[s.hook("attn.hook_attn_scores")][0, head, dest, src])
    x = cache[s.hook("ln1.hook_normalized")][0]
    fq = qkt.encode_q(x[dest]).double()
    fk = qkt.encode_k(x[src]).double()
    g = head // s.group_size
    wq = qkt.q_decoder()[:, head].double()
    wk = qkt.k_decoder()[:, g].double()
    bq = qkt.q_dict.b_dec.view(s.n_heads, s.d_head)[head].double()
    bk = qkt.k_dict.b_dec.view(s.n_key_value_heads, s.d_head)[g].double()
    iq = fq.nonzero().squeeze(1)
    ik = fk.nonzero().squeeze(1)
    scale = float(layer_attention(model, s.layer).attn_scale)
    rq = rotate_at(model, s.layer, torch.cat([wq[iq], bq[None]]), dest)
    rk = rotate_at(model, s.layer, torch.cat([wk[ik], bk[None]]), src)
    inner = rq @ rk.T / scale  # [n_q + 1, n_k + 1]: features then the bias
    aq = torch.cat([fq[iq], fq.new_ones(1)])
    ak = torch.cat([fk[ik], fk.new_ones(1)])
    values = aq[:, None] * inner * ak[None, :]
    terms = _terms_frame(values, iq, ik, fq, fk)
    reconstructed = float(values.sum())
    error = pd.DataFrame(
        [{"kind": "error", "q_feature": -1, "k_feature": -1, "value": score - reconstructed}]
    )
    terms = pd.concat([terms, error], ignore_index=True)
    terms = terms.sort_values("value", key=lambda v: v.abs(), ascending=False)
    return ScoreAttribution(
        terms=terms.reset_index(drop=True),
        score=score,
        reconstructed=reconstructed,
        layer=s.layer,
        head=head,
        dest=dest,
        src=src,
    )


def _terms_frame(values: Tensor, iq: Tensor, ik: Tensor, fq: Tensor, fk: Tensor) -> pd.DataFrame:
    """One row per entry of ``values`` (``[n_q + 1, n_k + 1]``, the last row/column: biases)."""
    none = torch.tensor([-1])
    nan = torch.tensor([torch.nan], dtype=torch.float64)
    q_feat = torch.cat([iq.cpu(), none])[:, None].expand(values.shape).reshape(-1)
    k_feat = torch.cat([ik.cpu(), none])[None, :].expand(values.shape).reshape(-1)
    q_act = torch.cat([fq[iq].cpu(), nan])[:, None].expand(values.shape).reshape(-1)
    k_act = torch.cat([fk[ik].cpu(), nan])[None, :].expand(values.shape).reshape(-1)
    names = {
        (False, False): "pair",
        (False, True): "q_feature x k_bias",
        (True, False): "q_bias x k_feature",
        (True, True): "bias x bias",
    }
    kind = [
        names[qb, kb] for qb, kb in zip((q_feat < 0).tolist(), (k_feat < 0).tolist(), strict=True)
    ]
    return pd.DataFrame(
        {
            "kind": kind,
            "q_feature": q_feat.numpy(),
            "k_feature": k_feat.numpy(),
            "q_act": q_act.numpy(),
            "k_act": k_act.numpy(),
            "value": values.reshape(-1).cpu().numpy(),
        }
    )
