"""IOI prompt generation and the logit-difference metric."""

from __future__ import annotations

import pytest
import torch

from tl_superposition.ioi import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    logit_diff,
    make_ioi_dataset,
)


def test_template_families_are_large_enough():
    assert len(ABBA_TEMPLATES) >= 15 and len(BABA_TEMPLATES) >= 15
    for abba, baba in zip(ABBA_TEMPLATES, BABA_TEMPLATES):
        assert abba.index("[A]") < abba.index("[B]")
        assert baba.index("[B]") < baba.index("[A]")


@pytest.mark.parametrize("prepend_bos", [False, True])
@pytest.mark.parametrize("prompt_type", ["ABBA", "BABA", "mixed"])
def test_positions_point_at_the_names(gpt2_tokenizer, prompt_type, prepend_bos):
    ds = make_ioi_dataset(
        gpt2_tokenizer, 40, prompt_type=prompt_type, seed=3, prepend_bos=prepend_bos
    )
    rows = torch.arange(len(ds))
    assert (ds.tokens[rows, ds.io_pos] == ds.io_tokens).all()
    assert (ds.tokens[rows, ds.s1_pos] == ds.s_tokens).all()
    assert (ds.tokens[rows, ds.s2_pos] == ds.s_tokens).all()
    assert (ds.end_pos == ds.lengths - 1).all()
    assert (ds.s2_pos > torch.maximum(ds.io_pos, ds.s1_pos)).all()
    assert (ds.io_tokens != ds.s_tokens).all()
    for i in range(len(ds)):
        n = int(ds.lengths[i])
        expected = gpt2_tokenizer.encode(ds.prompts[i])
        if prepend_bos:
            expected = [gpt2_tokenizer.bos_token_id] + expected
        assert ds.tokens[i, :n].tolist() == expected
        assert gpt2_tokenizer.decode([int(ds.io_tokens[i])]) == " " + ds.io_names[i]
    types = set(ds.prompt_types)
    if prompt_type == "mixed":
        assert types == {"ABBA", "BABA"}
    else:
        assert types == {prompt_type}
    abba = torch.tensor([t == "ABBA" for t in ds.prompt_types])
    assert (ds.io_pos[abba] < ds.s1_pos[abba]).all()
    assert (ds.io_pos[~abba] > ds.s1_pos[~abba]).all()


def test_deterministic_for_a_seed(gpt2_tokenizer):
    a = make_ioi_dataset(gpt2_tokenizer, 30, seed=7)
    b = make_ioi_dataset(gpt2_tokenizer, 30, seed=7)
    c = make_ioi_dataset(gpt2_tokenizer, 30, seed=8)
    assert a.prompts == b.prompts and torch.equal(a.tokens, b.tokens)
    assert a.prompts != c.prompts


def test_dataframe_and_subsets(gpt2_tokenizer):
    ds = make_ioi_dataset(gpt2_tokenizer, 10, seed=0)
    df = ds.to_dataframe()
    assert list(df.columns[:8]) == [
        "prompt_id",
        "text",
        "io",
        "s",
        "io_pos",
        "s1_pos",
        "s2_pos",
        "end_pos",
    ]
    sub = ds[2:5]
    assert sub.prompts == ds.prompts[2:5]
    assert torch.equal(sub.tokens, ds.tokens[2:5, : int(ds.lengths[2:5].max())])


def test_bad_input(gpt2_tokenizer):
    with pytest.raises(ValueError, match="n_prompts"):
        make_ioi_dataset(gpt2_tokenizer, 0)
    with pytest.raises(ValueError, match="at least 2"):
        make_ioi_dataset(gpt2_tokenizer, 5, names=["Mary", "Bartholomewson"])
    with pytest.raises(ValueError, match=r"\[B\]"):
        make_ioi_dataset(
            gpt2_tokenizer, 5, templates=["When [A] went to the [PLACE], [B] gave it to"]
        )
    with pytest.raises(ValueError, match="follow a space"):
        make_ioi_dataset(gpt2_tokenizer, 5, templates=["[A] and [B] met. [B] waved to"])
    with pytest.raises(ValueError, match="prompt_type"):
        make_ioi_dataset(gpt2_tokenizer, 5, prompt_type="ABAB")


def test_logit_diff_matches_direct_computation(tiny_gpt2):
    ds = make_ioi_dataset(tiny_gpt2, 12, seed=1)
    ld = logit_diff(tiny_gpt2, ds, batch_size=5)
    with torch.no_grad():
        for i in range(len(ds)):
            n = int(ds.lengths[i])
            logits = tiny_gpt2(ds.tokens[i : i + 1, :n])[0, -1]
            expected = logits[ds.io_tokens[i]] - logits[ds.s_tokens[i]]
            assert torch.isclose(ld[i], expected, atol=1e-4), (i, ld[i], expected)
