"""The edge rules on hand-made numbers: each returns exactly the edges its definition gives."""

from __future__ import annotations

import pytest
import torch

from tl_superposition.tracing.edges import paper_rule, positive_rule, select_edges


def _rows(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_paper_rule_uses_the_net_sum_negatives_included():
    # net sum 10 - 4 = 6 -> threshold 4.2; sorted 5, 3, 2, 0, -4: cumsum 5 > 4.2 at once
    m = _rows([3.0, 5.0, -4.0, 2.0, 0.0])
    assert paper_rule(m, 0.7).tolist() == [[False, True, False, False, False]]
    # the positive rule ignores the negative write: 0.7 * 10 = 7 needs 5 + 3
    assert positive_rule(m, 0.7).tolist() == [[True, True, False, False, False]]


def test_paper_rule_keeps_every_tie_at_the_cutoff():
    # sum 10, threshold 7: cumsum 4, 7 (not > 7), 10 > 7 -> cutoff 3, and all three 3s are kept
    m = _rows([3.0, 4.0, 3.0, 3.0, -3.0])
    assert paper_rule(m, 0.7).tolist() == [[True, True, True, True, False]]
    # the positive rule breaks the tie by column order: 0.7 * 13 = 9.1 -> 4 + 3 + 3 (cols 1, 0, 2)
    assert positive_rule(m, 0.7).tolist() == [[True, True, True, False, False]]


def test_paper_rule_strict_exceedance_and_degenerate_rows():
    m = _rows(
        [1.0, 1.0, 0.0, 0.0],  # threshold 1.4: 1 then 2 > 1.4 -> cutoff 1, both ones
        [0.0, 0.0, 0.0, 0.0],  # threshold 0, cumsum never > 0 -> nothing
        [-1.0, -2.0, -3.0, -0.5],  # sum -6.5, threshold -4.55: -0.5 > -4.55 -> one edge
        [2.0, -1.0, -1.0, 0.0],  # net 0: threshold 0, 2 > 0 -> the 2
    )
    want = [
        [True, True, False, False],
        [False, False, False, False],
        [False, False, False, True],
        [True, False, False, False],
    ]
    assert paper_rule(m, 0.7).tolist() == want
    # with frac = 1 the threshold is the whole net sum, which the cumsum must exceed strictly
    m = _rows([2.0, 1.0, 1.0])  # cumsum 2, 3, 4: never > 4 -> no edge
    assert paper_rule(m, 1.0).tolist() == [[False, False, False]]
    assert positive_rule(m, 1.0).tolist() == [[True, True, True]]


def test_rules_ignore_invalid_columns():
    m = _rows([10.0, 3.0, 2.0, 100.0])
    valid = torch.tensor([[True, True, True, False]])
    # without column 3: sum 15, threshold 10.5: 10 then 13 > 10.5 -> cutoff 3
    assert paper_rule(m, 0.7, valid).tolist() == [[True, True, False, False]]
    assert positive_rule(m, 0.7, valid).tolist() == [[True, True, False, False]]
    none_valid = torch.zeros_like(valid)
    assert not paper_rule(m, 0.7, none_valid).any() and not positive_rule(m, 0.7, none_valid).any()


def test_rules_match_their_definitions_on_random_rows():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(500, 12, generator=g, dtype=torch.float64)
    m[:50] = m[:50].round()  # many ties
    got_paper, got_pos = paper_rule(m, 0.7), positive_rule(m, 0.7)
    for i, row in enumerate(m.tolist()):
        s = sorted(row, reverse=True)
        thresh, cs, cutoff = 0.7 * sum(row), 0.0, None
        for v in s:
            cs += v
            if cs > thresh:
                cutoff = v
                break
        want = [cutoff is not None and v >= cutoff for v in row]
        assert got_paper[i].tolist() == want, (i, row)
        pos = [max(v, 0.0) for v in row]
        target, kept, acc = 0.7 * sum(pos), set(), 0.0
        for j in sorted(range(len(row)), key=lambda j: (-pos[j], j)):
            if acc >= target - 1e-6 * sum(abs(v) for v in row) or pos[j] <= 0:
                break
            kept.add(j)
            acc += pos[j]
        assert got_pos[i].tolist() == [j in kept for j in range(len(row))], (i, row)


def test_select_edges_checks_its_arguments():
    m = _rows([1.0, 2.0])
    assert select_edges(m, "paper").tolist() == paper_rule(m).tolist()
    with pytest.raises(ValueError, match="edge rule"):
        select_edges(m, "largest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frac"):
        paper_rule(m, 0.0)
    with pytest.raises(ValueError, match="valid"):
        positive_rule(m, 0.7, torch.ones(2, 2, dtype=torch.bool))
