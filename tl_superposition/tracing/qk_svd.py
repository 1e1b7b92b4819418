"""Exact SVD of each attention head's QK bilinear form, from thin factors.

For head ``(L, h)`` and the augmented, normalised residual ``x~ = [x, 1]`` with
``x = blocks.L.ln1.hook_normalized``, the attention score that TransformerLens stores in
``blocks.L.attn.hook_attn_scores`` is (Franco & Crovella 2024, arXiv 2410.00340, Sec. 3)::

    score(dest, src) = x~_dest^T  Omega  x~_src,
    Omega = [W_Q; b_Q] R(dest - src) [W_K; b_K]^T / attn_scale

``[W_Q; b_Q]`` and ``[W_K; b_K]`` are ``(d_model + 1) x d_head``; ``R(offset)`` is the identity
for absolute-position models and the rotary-embedding rotation between the query and key
positions for RoPE models (so there is one form per offset). For grouped-query attention each
query head uses the key weights of its key/value group.

Omega has rank <= d_head, so its SVD comes from the factors without forming the
``(d_model+1)^2`` matrix: QR-factorise ``[W_Q; b_Q] = Q_q R_q`` and ``[W_K; b_K] = Q_k R_k``,
take the SVD of the ``d_head x d_head`` core ``R_q R(offset) R_k^T / attn_scale = U_c S V_c^T``;
then ``U = Q_q U_c`` and ``V = Q_k V_c`` give ``Omega = U diag(S) V^T`` exactly. The singular
values are in score units (the ``1 / attn_scale`` is inside S).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_superposition.models import nonstandard_attention


def check_supported(model: HookedTransformer) -> None:
    """Raise ``NotImplementedError`` for attention variants whose score is not ``x~ Omega x~``.

    Supported: absolute positions (GPT-2 style) and rotary embeddings (Llama style), with
    standard or grouped-query attention, LayerNorm or RMSNorm.
    """
    cfg = model.cfg
    problems = nonstandard_attention(cfg)
    if (getattr(cfg, "attn_scores_soft_cap", None) or -1.0) > 0:
        problems.append("attention-score soft-capping")
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        problems.append(f"normalization_type={cfg.normalization_type!r}")
    if problems:
        raise NotImplementedError(
            "SVD-sparse decomposition needs scores that are a bilinear form of the normalised "
            f"residual stream; this model has {', '.join(problems)}"
        )


def qk_factors(
    model: HookedTransformer, layer: int
) -> tuple[
    Float[Tensor, "n_heads d_model_plus_1 d_head"], Float[Tensor, "n_heads d_model_plus_1 d_head"]
]:
    """The augmented query and key factors ``[W_Q; b_Q]`` and ``[W_K; b_K]`` of every query head.

    For grouped-query attention the key factor of query head ``h`` is that of its key/value
    group (TransformerLens's ``attn.W_K`` already repeats the groups).

    Raises:
        IndexError: ``layer`` is out of range.
    """
    if not 0 <= layer < model.cfg.n_layers:
        raise IndexError(
            f"layer {layer} out of range: the model has {model.cfg.n_layers} layers "
            f"(0-{model.cfg.n_layers - 1})"
        )
    attn = model.blocks[layer].attn
    wq = torch.cat([attn.W_Q, attn.b_Q[:, None, :]], dim=1)
    wk = torch.cat([attn.W_K, attn.b_K[:, None, :]], dim=1)
    return wq.detach(), wk.detach()


def rotary_matrices(
    model: HookedTransformer, layer: int, offsets: Tensor
) -> Float[Tensor, "n_offsets d_head d_head"]:
    """Matrices ``A_t`` with ``rope(v, position t) = v @ A_t`` for row vectors ``v``.

    Built by applying the layer's own ``apply_rotary`` to the identity, so any rotary variant
    TransformerLens implements (rotate-half or adjacent pairs, partial ``rotary_dim``) is
    reproduced. For rotary models the score between positions ``p >= s`` uses
    ``A_p A_s^T = A_(p - s)``: it depends only on the offset.
    """
    attn = model.blocks[layer].attn
    d_head = model.cfg.d_head
    max_off = int(offsets.max()) + 1 if offsets.numel() else 1
    eye = torch.eye(d_head, dtype=attn.rotary_cos.dtype, device=attn.rotary_cos.device)
    # x[i, t, 0, :] = e_i at position t  ->  out[i, t, 0, :] = rope(e_i, t) = row i of A_t
    x = eye[:, None, None, :].expand(d_head, max_off, 1, d_head).contiguous()
    out = attn.apply_rotary(x, 0, None)[:, :, 0, :]  # [i, t, j]
    return out.permute(1, 0, 2)[offsets.long().cpu()].to(torch.float64)


def core_svd(
    core: Float[Tensor, "*batch d_head d_head"], tol: float = 1e-9
) -> tuple[
    Float[Tensor, "*batch d_head d_head"],
    Float[Tensor, "*batch d_head"],
    Float[Tensor, "*batch d_head d_head"],
]:
    """``(U, S, V)`` with ``core = U diag(S) V^T``, S descending, for a batch of float64 cores.

    From the symmetric eigendecomposition of ``core core^T = U diag(S^2) U^T`` (1.6 times as
    fast as ``torch.linalg.svd`` on SmolLM2's 64 x 64 cores, one CPU thread), then
    ``V = core^T U / S``. Since ``U`` is orthonormal, ``U diag(S) V^T = U U^T core = core``
    to rounding. ``V`` loses orthonormality where ``S`` spans many orders of magnitude;
    every core whose ``V^T V`` is off the identity by more than ``tol`` (or with a zero
    singular value) is decomposed again by ``torch.linalg.svd``.
    """
    eigval, u = torch.linalg.eigh(core @ core.transpose(-1, -2))
    s, u = eigval.flip(-1).clamp_min(0).sqrt(), u.flip(-1)
    v = core.transpose(-1, -2) @ u / s.clamp_min(torch.finfo(s.dtype).tiny)[..., None, :]
    eye = torch.eye(core.shape[-1], dtype=core.dtype, device=core.device)
    err = (v.transpose(-1, -2) @ v - eye).abs().amax((-1, -2))
    bad = (err > tol) | (s[..., -1] <= 0)
    if bad.any():
        ub, sb, vhb = torch.linalg.svd(core[bad])
        u[bad], s[bad], v[bad] = ub, sb, vhb.transpose(-1, -2)
    return u, s, v


@dataclass(repr=False)
class LayerQK:
    """The thin SVD of every head's QK form in one layer, computed lazily per (offset, head).

    ``U[h, o] = Q_q[h] @ U_c[h, o]`` etc.; the class keeps the factors apart so that
    projecting a residual vector onto all singular directions costs ``d_model x d_head``
    once per head plus ``d_head x d_head`` per (head, offset).

    Attributes:
        layer: the layer index.
        q_basis, k_basis: ``[n_heads, d_model + 1, d_head]`` orthonormal columns (float64).
        rotary: whether scores depend on the offset ``dest - src``.
    """

    layer: int
    q_basis: Float[Tensor, "n_heads d_model_plus_1 d_head"]
    k_basis: Float[Tensor, "n_heads d_model_plus_1 d_head"]
    q_r: Float[Tensor, "n_heads d_head d_head"]
    k_r: Float[Tensor, "n_heads d_head d_head"]
    attn_scale: float
    rotary: bool
    _model: HookedTransformer
    # U_c, S, V_c per (offset, head), allocated for offsets 0 .. len - 1; ``_done`` marks
    # the pairs decomposed so far
    _cores: tuple[Tensor, Tensor, Tensor] | None = None
    _done: Tensor | None = None
    # rotary_matrices at offsets 0 .. len - 1 (rotary models), grown on demand
    _rot: Tensor | None = None
    # the bases in other dtypes, made on first use
    _bases: dict[tuple[str, torch.dtype], Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        n_heads, d_aug, d_head = self.q_basis.shape
        return (
            f"LayerQK(layer={self.layer}, n_heads={n_heads}, d_model={d_aug - 1}, "
            f"d_head={d_head}, rotary={self.rotary}, cached_cores={self.n_cached})"
        )

    @classmethod
    def from_model(cls, model: HookedTransformer, layer: int, n_offsets: int = 1) -> LayerQK:
        """QR-factorise the layer's query and key factors (float64).

        Args:
            model, layer: the layer.
            n_offsets: offsets the core arrays are allocated for at once (rotary models; a
                trace passes its longest prompt's length). More are allocated when asked for,
                at the cost of a copy of the arrays.
        """
        check_supported(model)
        wq, wk = qk_factors(model, layer)
        qq, rq = torch.linalg.qr(wq.to(torch.float64))
        qk, rk = torch.linalg.qr(wk.to(torch.float64))
        out = cls(
            layer=layer,
            q_basis=qq,
            k_basis=qk,
            q_r=rq,
            k_r=rk,
            attn_scale=float(model.blocks[layer].attn.attn_scale),
            rotary=model.cfg.positional_embedding_type == "rotary",
            _model=model,
        )
        out._grow(max(n_offsets, 1) if out.rotary else 1)
        return out

    def basis(
        self, side: str, dtype: torch.dtype
    ) -> Float[Tensor, "n_heads d_model_plus_1 d_head"]:
        """``q_basis`` (``side="q"``) or ``k_basis`` (``"k"``) in ``dtype``, converted once."""
        full = self.q_basis if side == "q" else self.k_basis
        if dtype == full.dtype:
            return full
        if (side, dtype) not in self._bases:
            self._bases[side, dtype] = full.to(dtype)
        return self._bases[side, dtype]

    @property
    def n_cached(self) -> int:
        """How many (offset, head) cores have been decomposed."""
        return 0 if self._done is None else int(self._done.sum())

    def _grow(self, n_offsets: int) -> tuple[Tensor, Tensor, Tensor]:
        """The core arrays, allocated for at least ``n_offsets`` offsets.

        Grown to at least twice their size, so a trace meeting longer and longer prompts
        copies them a few times only.
        """
        n_heads, d_head = self.q_r.shape[:2]
        have = 0 if self._cores is None else self._cores[1].shape[0]
        if n_offsets > have:
            extra = max(n_offsets, 2 * have) - have
            # left unset: ``_done`` marks what has been written
            new = (
                self.q_r.new_empty(extra, n_heads, d_head, d_head),
                self.q_r.new_empty(extra, n_heads, d_head),
                self.q_r.new_empty(extra, n_heads, d_head, d_head),
            )
            done = torch.zeros(extra, n_heads, dtype=torch.bool)
            if self._cores is not None and self._done is not None:
                new = tuple(torch.cat([old, p]) for old, p in zip(self._cores, new))
                done = torch.cat([self._done, done])
            self._cores, self._done = (new[0], new[1], new[2]), done
        assert self._cores is not None
        return self._cores

    def _rotations(self, offsets: Tensor) -> Float[Tensor, "n d_head d_head"]:
        """:func:`rotary_matrices` at ``offsets``, from a table kept and grown by doubling."""
        need = int(offsets.max()) + 1
        if self._rot is None or len(self._rot) < need:
            have = 0 if self._rot is None else len(self._rot)
            self._rot = rotary_matrices(self._model, self.layer, torch.arange(max(need, 2 * have)))
        return self._rot[offsets]

    def _missing(self, offset: Tensor, head: Tensor) -> tuple[Tensor, Tensor]:
        """The distinct pairs among ``(offset[i], head[i])`` whose cores are not decomposed yet.

        Returns:
            ``(offset, head)`` of those pairs (offsets are 0 for non-rotary models).
        """
        offset = offset.long().cpu() if self.rotary else torch.zeros_like(head.long().cpu())
        head = head.long().cpu()
        n_heads = self.q_r.shape[0]
        self._grow(int(offset.max()) + 1 if len(offset) else 1)
        assert self._done is not None
        key = offset * n_heads + head
        key = key[~self._done.flatten()[key]]  # usually none: skip the sort of unique()
        if len(key):
            key = key.unique()
        return key // n_heads, key % n_heads

    def _core_matrices(self, offset: Tensor, head: Tensor) -> Float[Tensor, "n d_head d_head"]:
        """The cores ``R_q R(offset) R_k^T / attn_scale`` of the pairs ``(offset[i], head[i])``."""
        dev = self.q_r.device
        h = head.to(dev)
        if self.rotary:
            rot = self._rotations(offset).to(dev)
            core = self.q_r[h] @ rot @ self.k_r[h].transpose(-1, -2)
        else:
            core = self.q_r[h] @ self.k_r[h].transpose(-1, -2)
        return core / self.attn_scale

    def _store(self, offset: Tensor, head: Tensor, u: Tensor, s: Tensor, v: Tensor) -> None:
        """Keep the :func:`core_svd` ``(u, s, v)`` of the pairs ``(offset[i], head[i])``.

        The pairs come from :meth:`_missing`, which grew the arrays to hold them.
        """
        cores = self._cores
        assert cores is not None and self._done is not None
        o, h = offset.to(cores[0].device), head.to(cores[0].device)
        cores[0][o, h], cores[1][o, h], cores[2][o, h] = u, s, v
        self._done[offset, head] = True

    def ensure(self, offset: Tensor, head: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Decompose the cores of the pairs ``(offset[i], head[i])`` not done yet (one batch).

        Only the (offset, head) pairs asked for are decomposed (:func:`core_svd`): a trace
        meets a fraction of every head's offsets.

        Args:
            offset, head: one pair per entry (``offset`` is ignored by non-rotary models).

        Returns:
            ``(U_c, S, V_c)`` stacked ``[n_offsets, n_heads, ...]``, indexed by offset (0 for
            non-rotary models) and head; only the pairs decomposed so far hold values (the
            other entries are unset).
        """
        o, h = self._missing(offset, head)
        if len(o):
            self._store(o, h, *core_svd(self._core_matrices(o, h)))
        assert self._cores is not None
        return self._cores

    def extend_to(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Decompose every head's cores at offsets ``0 .. n - 1`` (see :meth:`ensure`).

        Returns:
            ``(U_c, S, V_c)`` stacked ``[n_offsets, n_heads, ...]`` (for non-rotary models,
            one "offset" 0).
        """
        return self.ensure(*self._every_head(torch.arange(max(n, 1) if self.rotary else 1)))

    def _every_head(self, offsets: Tensor) -> tuple[Tensor, Tensor]:
        """``(offset, head)`` pairs of every head at each of ``offsets``."""
        n_heads = self.q_r.shape[0]
        return offsets.repeat_interleave(n_heads), torch.arange(n_heads).repeat(len(offsets))

    def cores(
        self, offsets: Tensor
    ) -> tuple[
        Float[Tensor, "n_offsets n_heads d_head d_head"],
        Float[Tensor, "n_offsets n_heads d_head"],
        Float[Tensor, "n_offsets n_heads d_head d_head"],
    ]:
        """``(U_c, S, V_c)`` of the core of every head at each requested offset.

        Offsets are 0 for non-rotary models. Singular values are sorted descending and in
        ``hook_attn_scores`` units. Results are cached, so each (head, offset) is decomposed
        once.
        """
        offsets = offsets.long().cpu()
        if not len(offsets):
            raise ValueError("cores() needs at least one offset")
        if not self.rotary:
            offsets = torch.zeros_like(offsets)
        cores = self.ensure(*self._every_head(offsets))
        idx = offsets.to(cores[0].device)
        u, s, v = (t[idx] for t in cores)
        return u, s, v

    def row_cores(
        self, offset: Tensor, head: Tensor
    ) -> tuple[
        Float[Tensor, "n d_head d_head"],
        Float[Tensor, "n d_head"],
        Float[Tensor, "n d_head d_head"],
    ]:
        """``(U_c, S, V_c)`` of head ``head[i]`` at offset ``offset[i]``, one per row.

        Shapes ``[n, d_head, d_head]``, ``[n, d_head]``, ``[n, d_head, d_head]``.
        """
        if not len(offset):
            d_head = self.q_r.shape[-1]
            empty = self.q_r.new_zeros(0, d_head, d_head)
            return empty, self.q_r.new_zeros(0, d_head), empty
        offset = offset.long().cpu() if self.rotary else torch.zeros_like(offset.long().cpu())
        cores = self.ensure(offset, head)
        dev = cores[0].device
        o, h = offset.to(dev), head.to(dev)
        u, s, v = (t[o, h] for t in cores)
        return u, s, v

    def svd(
        self, head: int, offset: int = 0
    ) -> tuple[
        Float[Tensor, "d_model_plus_1 d_head"],
        Float[Tensor, " d_head"],
        Float[Tensor, "d_model_plus_1 d_head"],
    ]:
        """The full ``(U, S, V)`` of head ``head`` at ``offset``: ``Omega = U diag(S) V^T``.

        Raises:
            IndexError: ``head`` is out of range.
        """
        n_heads = self.q_basis.shape[0]
        if not 0 <= head < n_heads:
            raise IndexError(f"head {head} out of range: layer {self.layer} has {n_heads} heads")
        uc, s, vc = self.cores(torch.tensor([offset]))
        return self.q_basis[head] @ uc[0, head], s[0, head], self.k_basis[head] @ vc[0, head]

    def omega(self, head: int, offset: int = 0) -> Float[Tensor, "d_model_plus_1 d_model_plus_1"]:
        """The dense bilinear matrix (for checks; ``(d_model+1)^2`` floats)."""
        u, s, v = self.svd(head, offset)
        return (u * s) @ v.T


# the attention parameters a head's QK form is made of (TransformerLens names; grouped-query
# attention keeps its key weights as ``_W_K`` and ``_b_K``)
QK_PARAMETERS = ("W_Q", "b_Q", "W_K", "b_K", "_W_K", "_b_K")


def _qk_weights(model: HookedTransformer) -> list[Tensor]:
    """The query and key weights and biases of every layer, in a fixed order."""
    return [
        p.detach()
        for block in model.blocks
        for name, p in block.attn.named_parameters()
        if name in QK_PARAMETERS
    ]


class QKSVDCache:
    """Per-layer :class:`LayerQK` objects of a model, built on first use and kept.

    The decompositions depend on the query and key weights only, so one cache can serve every
    trace of a model (:func:`~tl_superposition.tracing.trace.trace`'s ``qk``): each (offset,
    head) core is decomposed once, by the first trace that meets it. The cache keeps a copy
    of those weights (``W_Q``, ``b_Q``, ``W_K``, ``b_K``: 53 MB for SmolLM2-135M) to refuse
    itself once they change (:meth:`check_model`).

    Args:
        model: the model.
        n_offsets: offsets each layer's core arrays are allocated for at once
            (:meth:`LayerQK.from_model`; the longest prompt's length saves later copies).
    """

    def __init__(self, model: HookedTransformer, n_offsets: int = 1):
        check_supported(model)
        self.model = model
        self.n_offsets = n_offsets
        self._layers: dict[int, LayerQK] = {}
        self._weights = [w.clone() for w in _qk_weights(model)]

    def check_model(self, model: HookedTransformer) -> None:
        """Raise ``ValueError`` unless this cache was made for ``model`` as it is now.

        The query and key weights and biases are compared with the cache's copy, so every
        change is seen, however it was made (replaced parameters, in-place edits, edits
        through ``.data`` or ``load_state_dict``); changes to other weights (``W_V``,
        ``W_O``, the MLPs) leave the decompositions valid and are accepted.

        Raises:
            ValueError: ``model`` is another model, or a query or key weight or bias of it
                changed since the cache was made (its decompositions would be stale).
        """
        if model is not self.model:
            raise ValueError(
                "this QKSVDCache was made for another model; make one with QKSVDCache(model)"
            )
        now = _qk_weights(model)
        if len(now) != len(self._weights) or not all(map(torch.equal, now, self._weights)):
            raise ValueError(
                "the model's query or key weights changed since this QKSVDCache was made; its "
                "decompositions are stale: make a new one with QKSVDCache(model)"
            )

    def __getitem__(self, layer: int) -> LayerQK:
        if layer not in self._layers:
            self._layers[layer] = LayerQK.from_model(self.model, layer, self.n_offsets)
        return self._layers[layer]
