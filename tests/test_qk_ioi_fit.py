"""The IOI column of a QK transcoder's evaluation (fast tests on tiny models)."""

from __future__ import annotations

import pytest
import torch
from test_qk import exact_qkt_at

from tl_superposition.ioi import make_ioi_dataset
from tl_superposition.qk import QKTranscoder
from tl_superposition.qk.ioi_fit import ioi_fit

LAYER = 1


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def exact_qkt(model) -> QKTranscoder:
    return exact_qkt_at(model, LAYER)


def test_exact_dictionaries_leave_no_error_and_the_true_pattern(model):
    ds = make_ioi_dataset(model, 12, seed=1)
    fit = ioi_fit(exact_qkt(model), model, ds, heads=[0, 2], pattern_thresh=0.2, batch_size=5)
    assert len(fit.firings) > 0 and set(fit.firings["head"]) <= {0, 2}
    assert (fit.firings.src > 0).all() and (fit.firings.pattern >= 0.2).all()
    s = fit.summary()
    assert s["error_frac_ioi"] < 1e-4
    for role in ("io", "s2"):
        assert s[f"attn_end_{role}_spliced"] == pytest.approx(s[f"attn_end_{role}_true"], abs=1e-5)
    assert list(fit.heads["head"]) == [0, 2]


def test_a_random_dictionary_shows_its_error(model):
    ds = make_ioi_dataset(model, 12, seed=1)
    gen = torch.Generator().manual_seed(0)
    qkt = QKTranscoder.for_model(model, LAYER, d_hidden=32, generator=gen)
    fit = ioi_fit(qkt, model, ds, pattern_thresh=0.2)
    f = fit.firings
    assert fit.summary()["error_frac_ioi"] > 0.05
    torch.testing.assert_close(
        torch.tensor(f.error.to_numpy()), torch.tensor((f.score - f.score_hat).to_numpy())
    )
    with pytest.raises(ValueError, match="heads must be in"):
        ioi_fit(qkt, model, ds, heads=[9])


def test_the_error_is_split_by_the_dictionary_that_misses(model):
    ds = make_ioi_dataset(model, 12, seed=1)
    qkt = exact_qkt(model)
    with torch.no_grad():  # the query dictionary stays exact, the key dictionary is spoilt
        qkt.k_dict.W_dec.add_(
            0.5 * torch.randn(qkt.k_dict.W_dec.shape, generator=torch.Generator().manual_seed(1))
        )
    fit = ioi_fit(qkt, model, ds, pattern_thresh=0.2)
    s = fit.summary()
    assert s["error_frac_ioi_q"] < 1e-4 < 0.05 < s["error_frac_ioi_k"]
    assert (fit.heads.error_frac_q < 1e-4).all()


def test_text_error_share_is_zero_for_exact_dictionaries_only(model):
    from test_qk import tokens_of

    from tl_superposition.qk.ioi_fit import text_error_share

    tokens = tokens_of(model, 6)
    assert text_error_share(exact_qkt(model), model, tokens, [0, 2], pattern_thresh=0.2) < 1e-4
    gen = torch.Generator().manual_seed(0)
    noisy = QKTranscoder.for_model(model, LAYER, d_hidden=32, generator=gen)
    assert text_error_share(noisy, model, tokens, pattern_thresh=0.2) > 0.05
