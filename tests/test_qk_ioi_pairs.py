"""The pairs that carry a head's IOI firings; naming features from text (fast tests)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_qk import exact_qkt_at

from tl_superposition.ioi import make_ioi_dataset
from tl_superposition.qk.ioi_pairs import feature_card, ioi_pairs
from tl_superposition.qk.tables import top_activating_contexts, top_tokens


def test_pair_terms_with_the_rest_and_error_sum_to_the_heads_score(tiny_llama):
    model, layer, head = tiny_llama, 2, 1
    qkt = exact_qkt_at(model, layer)
    ds = make_ioi_dataset(model, 10, seed=3)
    d = 2 * model.cfg.d_model
    pairs = ioi_pairs(qkt, model, ds, head, "END", "S2", top=None, max_active=d, batch_size=4)
    assert pairs.attrs["n_prompts"] == 10
    assert abs(pairs.attrs["mean_error"]) < 1e-4
    parts = pairs.mean_term.sum() + pairs.attrs["mean_rest"] + pairs.attrs["mean_error"]
    assert parts == pytest.approx(pairs.attrs["mean_score"], abs=1e-5)
    assert (pairs.n_prompts >= 1).all() and (pairs.mean_q_act > 0).all()
    top = ioi_pairs(qkt, model, ds, head, "END", "S2", top=3, max_active=d, batch_size=4)
    assert top.equals(pairs.head(3))  # the same ranking, cut
    with pytest.raises(ValueError, match="unknown role"):
        ioi_pairs(qkt, model, ds, head, "END", "IO2")


class Chars:
    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join("|" if i == 0 else chr(ord("a") + i) for i in ids)


def test_contexts_stop_at_separators_and_top_tokens_rank_by_activation():
    tokens = torch.tensor([[1, 2, 0, 3, 4, 5, 0, 6]])
    acts = torch.zeros(1, 8, 2)
    acts[0, 4, 1], acts[0, 7, 1], acts[0, 1, 1] = 3.0, 1.0, 0.5
    ctx = top_activating_contexts(acts, tokens, Chars(), 1, n=2, separators={0})
    assert list(ctx.text) == ["d**e**f", "**g**"]  # never across a "|" separator
    plain = top_activating_contexts(acts, tokens, Chars(), 1, n=1)
    assert plain.text[0] == "bc|d**e**f|g"
    tt = top_tokens(acts, tokens, Chars(), 1)
    assert list(tt.token) == ["e", "g", "c"] and tt.share.sum() == pytest.approx(1.0)
    card = feature_card(acts, tokens, Chars(), 1, separators={0})
    assert card["density"] == pytest.approx(3 / 8)
    assert isinstance(card["contexts"], pd.DataFrame) and len(card["contexts"]) == 3
