"""Dead features: counted over a window of training tokens, and resampled.

A feature is *dead* when it has not fired (activation > 0) on any of the last
``window`` training tokens. :class:`FiringTracker` records, per feature, the training-token
count at which it last fired, so the count is exact for any window.

Dead features are *resampled* as in Bricken et al. (2023, "Towards Monosemanticity"), adapted
to transcoders: each dead feature is re-pointed at one input the dictionary currently handles
badly. Inputs are drawn with probability proportional to their squared reconstruction error
``||y - y_hat||^2`` (y the true query or key); the new decoder row points along that error,
with the mean norm of the living rows; the new encoder column points along the centred input,
with ``enc_norm`` times the mean norm of the living columns; the encoder bias centres it like
the others; Adam's moments of the changed weights are reset. Why resampling rather than an
auxiliary loss: it works the same for ReLU and TopK dictionaries, needs no extra term in the
KL objective, and puts dead capacity where the reconstruction is worst.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from sae_lens import Transcoder
from torch import Tensor


class FiringTracker:
    """Training-token count at which each feature last fired.

    Args:
        d_sae: number of features.
    """

    def __init__(self, d_sae: int) -> None:
        self.last_fired = torch.zeros(d_sae, dtype=torch.long)

    def update(self, f: Float[Tensor, "... d_sae"], tokens_seen: int) -> None:
        """Record the features active in ``f``; ``tokens_seen`` counts this batch too."""
        fired = (f.detach().reshape(-1, f.shape[-1]) > 0).any(0).cpu()
        self.last_fired[fired] = int(tokens_seen)

    def dead(self, tokens_seen: int, window: int) -> Bool[Tensor, " d_sae"]:
        """Features silent on the last ``window`` tokens (none before ``window`` tokens)."""
        if tokens_seen < window:
            return torch.zeros_like(self.last_fired, dtype=torch.bool)
        return self.last_fired <= tokens_seen - window

    def reset(self, features: Bool[Tensor, " d_sae"], tokens_seen: int) -> None:
        """Give resampled features a fresh window."""
        self.last_fired[features] = int(tokens_seen)

    def state_dict(self) -> dict[str, Tensor]:
        """For checkpoints."""
        return {"last_fired": self.last_fired.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """From :meth:`state_dict`."""
        self.last_fired = state["last_fired"].clone()


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def resample_dead(
    sae: Transcoder,
    dead: Bool[Tensor, " d_sae"],
    x: Float[Tensor, "n d_in"],
    error: Float[Tensor, "n d_out"],
    x_mean: Float[Tensor, " d_in"],
    *,
    enc_norm: float = 0.2,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Re-initialise the ``dead`` features of ``sae`` (see the module docstring).

    Args:
        x: candidate inputs (``ln1.hook_normalized`` rows).
        error: ``y - y_hat`` of the same rows (true minus reconstructed queries or keys).
        x_mean: the data mean of the inputs (the centring of every feature).
        enc_norm: new encoder column norm as a fraction of the living columns' mean norm.
        generator: random source of the choice of inputs.
        optimizer: an Adam optimiser over the dictionary's parameters, whose moments of the
            changed rows/columns are zeroed.

    Returns:
        The number of features resampled.
    """
    idx = dead.nonzero().squeeze(1).to(sae.W_dec.device)
    n = int(idx.numel())
    if n == 0:
        return 0
    weights = error.float().pow(2).sum(-1).cpu()
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    pick = torch.multinomial(weights, n, replacement=n > weights.numel(), generator=generator)
    pick = pick.to(x.device)
    alive = ~dead.to(sae.W_dec.device)
    if alive.any():
        dec_norm = sae.W_dec[alive].norm(dim=-1).mean()
        enc_col = sae.W_enc[:, alive].norm(dim=0).mean()
    else:
        dec_norm = sae.W_dec.norm(dim=-1).mean()
        enc_col = sae.W_enc.norm(dim=0).mean()
    new_dec = _unit(error[pick].to(sae.W_dec)) * dec_norm
    new_enc = _unit((x[pick] - x_mean).to(sae.W_enc)) * enc_col * enc_norm
    sae.W_dec[idx] = new_dec
    sae.W_enc[:, idx] = new_enc.T
    sae.b_enc[idx] = -(x_mean.to(sae.W_enc) @ new_enc.T)
    if optimizer is not None:
        _reset_adam(optimizer, sae.W_dec, idx, dim=0)
        _reset_adam(optimizer, sae.W_enc, idx, dim=1)
        _reset_adam(optimizer, sae.b_enc, idx, dim=0)
    return n


def _reset_adam(opt: torch.optim.Optimizer, p: Tensor, idx: Tensor, dim: int) -> None:
    state = opt.state.get(p)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, idx, 0.0)
