"""Toy tasks, toy models and the head-subset ablation analysis."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tl_superposition.toys.analysis import (
    ablation_table,
    all_subsets,
    attention_ranking,
    head_usage,
    minimal_head_sets,
)
from tl_superposition.toys.datasets import (
    ov_coherent_dataset,
    overlap_copy_dataset,
    skip_trigram_dataset,
    skip_trigram_vocab,
)
from tl_superposition.toys.models import (
    load_toy_model,
    make_toy_model,
    monosemantic_skip_trigram_model,
    overlap_copy_model,
    save_toy_model,
    superposed_skip_trigram_model,
)
from tl_superposition.toys.settings import SETTINGS, get_setting
from tl_superposition.toys.train import ToyTrainConfig, task_accuracy, train_toy_model


def _reference_instances(tokens, k):
    """The sampling rule replayed per sequence in plain Python: (sample, a_pos, b_pos, b)."""
    out = []
    for i, row in enumerate(tokens.tolist()):
        a_pos = None
        for p in range(1, len(row)):
            tok = row[p]
            if a_pos is None and tok == 0:
                a_pos = p
            elif a_pos is not None and 1 <= tok <= k:
                out.append((i, a_pos, p, tok))
                a_pos = None
    return out


@pytest.mark.parametrize("k", [3, 5])
def test_skip_trigram_rules(k):
    ds = skip_trigram_dataset(k, 3000, seed=4)
    v = skip_trigram_vocab(k)
    t = ds.tokens
    assert t.shape == (3000, 11) and bool((t[:, 0] == v["BOS"]).all())
    assert int(t.min()) >= 0 and int(t.max()) < v["d_vocab"]
    # every instance: A at a_pos, B at b_pos, nothing but non-A, non-B tokens between them,
    # and C(B) right after B whenever the sequence goes on
    inst = ds.instances
    expected = _reference_instances(t, k)
    assert [tuple(r) for r in inst[:, [0, 1, 2]].tolist()] == [e[:3] for e in expected]
    assert inst[:, 4].tolist() == [e[3] - 1 for e in expected]
    done = inst[inst[:, 3] >= 0]
    assert bool((t[done[:, 0], done[:, 2] + 1] == t[done[:, 0], done[:, 2]] + k).all())
    assert bool((inst[inst[:, 3] < 0, 2] == 10).all())  # only a final B lacks its C
    # the asked positions are exactly the completed instances
    s, p = ds.asked()
    assert torch.equal(torch.stack([s, p], 1), done[:, [0, 2]])
    assert bool((ds.targets[s, p] == t[s, p + 1]).all())
    assert bool((ds.task[s, p] == t[s, p] - 1).all())
    # every trigram occurs, roughly equally often
    counts = torch.bincount(ds.task[s, p], minlength=k).float()
    assert counts.min() > 0.8 * counts.mean()


def test_datasets_are_deterministic_per_seed():
    for make in (
        lambda s: skip_trigram_dataset(4, 500, seed=s),
        lambda s: ov_coherent_dataset(500, seed=s),
        lambda s: overlap_copy_dataset(500, seed=s),
    ):
        a, b, c = make(0), make(0), make(1)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.instances, b.instances)
        assert not torch.equal(a.tokens, c.tokens)


def test_ov_coherent_rules():
    ds = ov_coherent_dataset(4000, seed=0)
    p = ds.params
    t = ds.tokens
    assert ds.d_vocab == 22 and ds.n_tasks == 10
    assert bool((t[:, -1] == p["readoff"]).all())
    body = t[:, :-1]
    is_signal = (body >= 1) & (body <= 4)
    assert bool((is_signal.sum(1) == 2).all())
    assert bool(((body >= 5) & (body <= 11) | is_signal).all())
    inst = ds.instances
    a, b = t[inst[:, 0], inst[:, 1]], t[inst[:, 0], inst[:, 2]]
    assert bool((inst[:, 1] < inst[:, 2]).all())
    pairs = [p["pairs"].index((min(x, y), max(x, y))) for x, y in zip(a.tolist(), b.tolist())]
    assert inst[:, 4].tolist() == pairs
    assert torch.equal(ds.targets[:, -1], torch.tensor(p["outputs"])[inst[:, 4]])
    assert set(inst[:, 4].tolist()) == set(range(10))


def test_overlap_copy_rules():
    ds = overlap_copy_dataset(3000, seed=0)
    p = ds.params
    t = ds.tokens
    content = torch.tensor([tok for g in p["content"] for tok in g])
    is_content = torch.isin(t, content)
    assert bool((is_content.sum(1) == 1).all()) and bool((t[:, 0] == p["BOS"]).all())
    inst = ds.instances
    tok = t[inst[:, 0], inst[:, 1]]
    assert torch.equal(tok // 3, inst[:, 4])  # the content token belongs to the task
    assert torch.equal(t[:, -1], torch.tensor(p["trigger"])[inst[:, 4]])
    assert torch.equal(ds.targets[:, -1], tok)


def test_subset_keeps_instances_aligned():
    ds = skip_trigram_dataset(3, 200, seed=0)
    part = ds.subset(torch.tensor([5, 2, 9]))
    assert part.tokens.shape[0] == 3
    for sample, a, b, _, task in part.instances.tolist():
        assert int(part.tokens[sample, a]) == 0 and int(part.tokens[sample, b]) == task + 1
    assert sum(len(b) for b in ds.batches(64)) == 200


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n_positions"):
        skip_trigram_dataset(3, 10, n_positions=2)
    with pytest.raises(ValueError, match="n_trigrams"):
        skip_trigram_dataset(0, 10)
    with pytest.raises(ValueError, match="unknown toy setting"):
        get_setting("9H/9ST")


def test_toy_model_is_one_hot_and_only_attention_trains():
    m = make_toy_model(2, 8, seed=0)
    assert torch.equal(m.embed.W_E, torch.eye(8)) and torch.equal(m.unembed.W_U, torch.eye(8))
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"blocks.0.attn.{n}" for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
    )
    state = torch.random.get_rng_state()
    make_toy_model(2, 8, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # no global seeding
    assert not torch.equal(make_toy_model(2, 8, seed=1).blocks[0].attn.W_Q, m.blocks[0].attn.W_Q)


def test_toy_model_reaches_accuracy():
    """2 heads learn 3 skip trigrams above 99% in a few epochs."""
    setting = SETTINGS["2H/3ST"]
    train, val = setting.dataset(30_000, 0), setting.dataset(10_000, 1)
    model = make_toy_model(2, train.d_vocab, seed=0)
    result = train_toy_model(
        model, train, val, ToyTrainConfig(lr=1e-2, max_epochs=30), progress=False
    )
    assert result.reached, result.accuracy
    assert bool((task_accuracy(model, val) > 0.99).all())
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0]


def test_toy_model_round_trip(tmp_path):
    m = make_toy_model(3, 10, n_layers=2, seed=3)
    save_toy_model(m, tmp_path / "toy")
    back = load_toy_model(tmp_path / "toy")
    tokens = torch.randint(0, 10, (4, 7))
    assert torch.equal(m(tokens), back(tokens))
    with pytest.raises(FileNotFoundError, match="not a saved toy model"):
        load_toy_model(tmp_path)


def test_ablation_finds_the_hand_built_superposition():
    ds = skip_trigram_dataset(3, 5000, seed=1)
    model = superposed_skip_trigram_model()
    assert bool((task_accuracy(model, ds) > 0.99).all())
    table = ablation_table(model, ds)
    assert len(table) == 4 * 3  # 4 subsets of 2 heads x 3 trigrams
    acc = table.set_index(["task_name", "kept"])["accuracy"]
    assert acc[("0..1->4", "0.0")] > 0.99 and acc[("0..3->6", "0.1")] > 0.99
    assert acc[("0..2->5", "0.0")] < 0.01 and acc[("0..2->5", "0.1")] < 0.01
    assert acc[("0..2->5", "0.0+0.1")] > 0.99
    minimal = minimal_head_sets(table).set_index("task_name")
    assert minimal.loc["0..2->5", "sets"] == ["0.0+0.1"]
    usage = head_usage(model, ds).set_index(["task_name", "head"])
    assert usage.loc[("0..2->5", "0.0"), "needed"] and not usage.loc[("0..2->5", "0.0"), "solely"]
    assert usage.loc[("0..1->4", "0.0"), "solely"] and not usage.loc[("0..1->4", "0.1"), "needed"]


def test_ablation_on_monosemantic_and_overlapping_models():
    ds = skip_trigram_dataset(3, 3000, seed=1)
    minimal = minimal_head_sets(ablation_table(monosemantic_skip_trigram_model(), ds))
    assert minimal["sets"].tolist() == [["0.0"], ["0.1"], ["0.2"]]
    cp = overlap_copy_dataset(3000, seed=1)
    model = overlap_copy_model()
    assert bool((task_accuracy(model, cp) > 0.99).all())
    minimal = minimal_head_sets(ablation_table(model, cp))
    assert minimal["sets"].tolist() == [["0.0+0.1"], ["0.1+0.2"], ["0.0+0.2"]]


def test_all_subsets():
    s = all_subsets(3)
    assert s.shape == (8, 3) and len({tuple(r) for r in s.tolist()}) == 8
    assert s.sum(1).tolist() == sorted(s.sum(1).tolist())


def test_attention_ranking_reads_the_pattern():
    """A hand-built 2-head model whose heads prefer the signal tokens in opposite orders."""
    ds = ov_coherent_dataset(2000, seed=0)
    model = make_toy_model(2, ds.d_vocab, seed=0)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
            getattr(attn, name).zero_()
        attn.W_Q[:, 0, 0] = 1.0  # the read-off token queries
        for s in range(1, 5):
            attn.W_K[0, s, 0] = float(s)  # head 0 prefers 4 > 3 > 2 > 1
            attn.W_K[1, s, 0] = float(5 - s)  # head 1 prefers 1 > 2 > 3 > 4
    ranking = attention_ranking(model, ds)
    assert isinstance(ranking, pd.DataFrame) and len(ranking) == 8
    r = ranking.pivot(index="token", columns="head", values="rank")
    assert r[0].tolist() == [4, 3, 2, 1] and r[1].tolist() == [1, 2, 3, 4]
