"""QK transcoders on the real SmolLM2-135M-Instruct, layer 23 (RoPE, 9 heads sharing 3 KV heads).

Marked ``slow`` (the model loads from its cache in about a second; the tests take seconds).
"""

from __future__ import annotations

import pytest
import torch
from test_qk import exact_qkt_at

from tl_superposition.ioi import make_ioi_dataset
from tl_superposition.qk import QKTranscoder, attribute_score
from tl_superposition.qk.attention import attention_scores, layer_attention, log_pattern

pytestmark = pytest.mark.slow
LAYER = 23


@pytest.fixture(scope="module")
def ioi(smollm2):
    return make_ioi_dataset(smollm2, 4, seed=0)


def test_shape_and_exact_splice(smollm2, ioi):
    qkt = exact_qkt_at(smollm2, LAYER)
    s = qkt.shape
    assert (s.d_model, s.n_heads, s.n_key_value_heads, s.d_head) == (576, 9, 3, 64)
    assert s.positional_embedding_type == "rotary"
    tokens = ioi.tokens[:, : int(ioi.lengths.min())]
    clean, cache = smollm2.run_with_cache(tokens)
    attn = layer_attention(smollm2, LAYER)
    q = cache[f"blocks.{LAYER}.attn.hook_q"]
    k = cache[f"blocks.{LAYER}.attn.hook_k"]
    pattern = log_pattern(attention_scores(attn, q, k)).exp()
    torch.testing.assert_close(pattern, cache[f"blocks.{LAYER}.attn.hook_pattern"])
    with qkt.splice(smollm2):
        spliced = smollm2(tokens)
    torch.testing.assert_close(spliced, clean, atol=2e-3, rtol=0)


def test_attribution_of_end_to_io_sums_to_the_score(smollm2, ioi):
    gen = torch.Generator().manual_seed(0)
    qkt = QKTranscoder.for_model(smollm2, LAYER, d_hidden=256, generator=gen)
    for p in range(2):
        tokens = ioi.tokens[p, : int(ioi.lengths[p])]
        end, io = int(ioi.end_pos[p]), int(ioi.io_pos[p])
        a = attribute_score(qkt, smollm2, tokens, 0, end, io)
        assert a.terms["value"].sum() == pytest.approx(a.score, abs=1e-4)
        name = f"blocks.{LAYER}.attn.hook_attn_scores"
        with qkt.splice(smollm2):
            _, cache = smollm2.run_with_cache(tokens[None], names_filter=name)
        assert a.reconstructed == pytest.approx(float(cache[name][0, 0, end, io]), abs=1e-3)
