"""Toy tasks on which attention heads share work: skip trigrams and copy tasks.

Every generator returns a :class:`ToyDataset` built with tensor operations (one loop step per
*position*, never per sample) from a ``torch.Generator`` seeded with ``seed``, so the same
arguments give the same tensors on every machine. Besides the tokens, a dataset records
where the model is asked for an answer (``targets``), which task each answer belongs to
(``task``), and where the tokens that make up every instance sit (``instances``).

Tasks:

- :func:`skip_trigram_dataset` -- OV-incoherent skip trigrams ``[A] ... [B] -> [C]`` (the toy
  setting of the attention-head-superposition and gated-attention write-ups; token layout and
  sampling rule as in the public reproduction cmathw/gated-attn).
- :func:`ov_coherent_dataset` -- ``[A] ... [B] ... [readoff] -> C(A, B)`` after Greenspan &
  Wynroe's OV-coherent toy model: the answer at the read-off token depends on the unordered
  pair of signal tokens in the context.
- :func:`overlap_copy_dataset` -- three copy tasks whose answers need two ``d_head = 1`` heads
  each ("overlapping necessary superposition", a known limit of gated attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

#: Columns of :attr:`ToyDataset.instances`.
INSTANCE_COLUMNS = ("sample", "a_pos", "b_pos", "query_pos", "task")


@dataclass
class ToyDataset:
    """Token sequences of a toy task, with the answer positions and task instances.

    Attributes:
        tokens: int64 ``[n_samples, n_positions]``.
        targets: int64 ``[n_samples, n_positions]``: the token the model must predict *at*
            each position (its next token), ``-1`` where nothing is asked.
        task: int64 ``[n_samples, n_positions]``: the task (trigram) index of each asked
            position, ``-1`` elsewhere.
        instances: int64 ``[n_instances, 5]``, columns :data:`INSTANCE_COLUMNS`: sample index,
            positions of the two tokens the answer depends on (``a_pos``, ``b_pos``; for a
            skip trigram the A and the B), the position where the answer is asked
            (``query_pos``) and the task index. A skip trigram whose B is the last token has no
            completion inside the sequence: it is listed with ``query_pos = -1`` and is not
            asked in ``targets``.
        task_names: one name per task index, e.g. ``"0..1->4"`` for the skip trigram
            ``[0] ... [1] -> [4]``.
        d_vocab: vocabulary size (token ids are ``0 .. d_vocab-1``).
        name: the generator (``"skip_trigram"``, ``"ov_coherent"``, ``"overlap_copy"``).
        params: the generator's arguments (seed included) and its token layout.
    """

    tokens: Int[Tensor, "n_samples n_positions"]
    targets: Int[Tensor, "n_samples n_positions"]
    task: Int[Tensor, "n_samples n_positions"]
    instances: Int[Tensor, "n_instances 5"]
    task_names: list[str]
    d_vocab: int
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tasks(self) -> int:
        """Number of tasks (trigrams, copy tasks, output classes)."""
        return len(self.task_names)

    @property
    def n_positions(self) -> int:
        """Sequence length."""
        return int(self.tokens.shape[1])

    def asked(self) -> tuple[Int[Tensor, " n_asked"], Int[Tensor, " n_asked"]]:
        """``(sample, position)`` of every asked position, in row-major order."""
        s, p = (self.targets >= 0).nonzero(as_tuple=True)
        return s, p

    def subset(self, rows: slice | Tensor) -> ToyDataset:
        """The samples ``rows`` (a slice or index tensor) as a new dataset."""
        idx = torch.arange(len(self))[rows] if isinstance(rows, slice) else rows.long()
        new_index = torch.full((len(self),), -1, dtype=torch.long)
        new_index[idx] = torch.arange(idx.numel())
        keep = new_index[self.instances[:, 0]] >= 0
        inst = self.instances[keep].clone()
        inst[:, 0] = new_index[inst[:, 0]]
        inst = inst[torch.argsort(inst[:, 0], stable=True)]
        return ToyDataset(
            tokens=self.tokens[idx],
            targets=self.targets[idx],
            task=self.task[idx],
            instances=inst,
            task_names=list(self.task_names),
            d_vocab=self.d_vocab,
            name=self.name,
            params=dict(self.params),
        )

    def batches(self, batch_size: int) -> list[ToyDataset]:
        """Consecutive batches of ``batch_size`` samples (the last may be smaller)."""
        return [self.subset(slice(lo, lo + batch_size)) for lo in range(0, len(self), batch_size)]

    def instances_frame(self) -> pd.DataFrame:
        """:attr:`instances` as a DataFrame with a ``task_name`` column."""
        df = pd.DataFrame(self.instances.numpy(), columns=list(INSTANCE_COLUMNS))
        df["task_name"] = [self.task_names[t] for t in df["task"]]
        return df


def _check_counts(n_samples: int, n_positions: int, min_positions: int) -> None:
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if n_positions < min_positions:
        raise ValueError(f"n_positions must be >= {min_positions}, got {n_positions}")


# --------------------------------------------------------------------------- skip trigrams


def skip_trigram_vocab(n_trigrams: int) -> dict[str, Any]:
    """Token layout of the OV-incoherent task with ``n_trigrams`` skip trigrams.

    Returns:
        ``{"A": 0, "B": [1..k], "C": [k+1..2k], "BOS": 2k+1, "d_vocab": 2k+2}``; ``C(b) = b + k``.
    """
    k = n_trigrams
    return {
        "A": 0,
        "B": list(range(1, k + 1)),
        "C": list(range(k + 1, 2 * k + 1)),
        "BOS": 2 * k + 1,
        "d_vocab": 2 * k + 2,
    }


def skip_trigram_dataset(
    n_trigrams: int, n_samples: int, n_positions: int = 11, seed: int = 0
) -> ToyDataset:
    """OV-incoherent skip trigrams ``[0] ... [b] -> [b + k]`` for ``b = 1 .. k``.

    Sequences start with BOS; every later token is drawn uniformly from the whole vocabulary
    (BOS included) except that (i) once an A has appeared and until its trigram is used, A is
    not drawn (tokens come from ``1 .. d_vocab-1``), and (ii) the first B after that A is
    followed by its C, which uses the A up. The next A opens a new trigram. This is the
    sampling rule of the gated-attention reproduction (cmathw/gated-attn), vectorised over
    samples.

    Args:
        n_trigrams: ``k``, the number of B tokens (trigrams); 3, 4, 5 in the published runs.
        n_samples: number of sequences (the authors: 100 batches x 1000).
        n_positions: sequence length, BOS included (authors: 11).
        seed: seed of the ``torch.Generator`` that draws the tokens.

    Returns:
        A :class:`ToyDataset`; ``targets`` hold C at every B position of a completed trigram
        (the model must predict C there), task index ``b - 1``.

    Raises:
        ValueError: ``n_trigrams < 1``, ``n_samples < 1`` or ``n_positions < 3``.
    """
    if n_trigrams < 1:
        raise ValueError(f"n_trigrams must be >= 1, got {n_trigrams}")
    _check_counts(n_samples, n_positions, 3)
    vocab = skip_trigram_vocab(n_trigrams)
    k, d_vocab = n_trigrams, vocab["d_vocab"]
    g = torch.Generator().manual_seed(seed)
    any_tok = torch.randint(0, d_vocab, (n_samples, n_positions), generator=g)
    no_a_tok = torch.randint(1, d_vocab, (n_samples, n_positions), generator=g)

    tokens = torch.empty(n_samples, n_positions, dtype=torch.long)
    tokens[:, 0] = vocab["BOS"]
    armed = torch.zeros(n_samples, dtype=torch.bool)  # an A waits for its B
    forced = torch.zeros(n_samples, dtype=torch.bool)  # this token is the C of the last B
    a_pos = torch.full((n_samples,), -1, dtype=torch.long)
    found: list[Tensor] = []
    for p in range(1, n_positions):
        tok = torch.where(armed, no_a_tok[:, p], any_tok[:, p])
        tok = torch.where(forced, tokens[:, p - 1] + k, tok)
        tokens[:, p] = tok
        is_b = armed & (tok >= 1) & (tok <= k)  # armed implies not forced
        rows = is_b.nonzero().squeeze(1)
        found.append(torch.stack([rows, a_pos[rows], torch.full_like(rows, p), tok[rows]], dim=1))
        is_a = ~forced & (tok == vocab["A"])
        a_pos = torch.where(is_a, p, a_pos)
        armed = (armed & ~is_b) | is_a
        forced = is_b

    raw = torch.cat(found)  # sample, a_pos, b_pos, b_token
    raw = raw[torch.argsort(raw[:, 0] * n_positions + raw[:, 2])]
    completed = raw[:, 2] < n_positions - 1
    instances = torch.stack(
        [raw[:, 0], raw[:, 1], raw[:, 2], torch.where(completed, raw[:, 2], -1), raw[:, 3] - 1],
        dim=1,
    )
    targets = torch.full_like(tokens, -1)
    task = torch.full_like(tokens, -1)
    done = raw[completed]
    targets[done[:, 0], done[:, 2]] = done[:, 3] + k
    task[done[:, 0], done[:, 2]] = done[:, 3] - 1
    names = [f"0..{b}->{b + k}" for b in vocab["B"]]
    params = {"n_trigrams": k, "n_samples": n_samples, "n_positions": n_positions, "seed": seed}
    return ToyDataset(
        tokens, targets, task, instances, names, d_vocab, "skip_trigram", {**params, **vocab}
    )


# --------------------------------------------------------------------------- OV-coherent


def ov_coherent_vocab(n_signal: int = 4, n_noise: int = 7) -> dict[str, Any]:
    """Token layout of the OV-coherent task (Greenspan & Wynroe: 4 signal, 7 noise tokens).

    Returns:
        ``{"readoff": 0, "signal": [1..n_signal], "noise": [...], "outputs": [...],
        "pairs": [(a, b), ...], "d_vocab": ...}``; output token ``outputs[i]`` answers the
        unordered signal pair ``pairs[i]`` (``a <= b``; 10 pairs for 4 signals).
    """
    signal = list(range(1, n_signal + 1))
    noise = list(range(n_signal + 1, n_signal + 1 + n_noise))
    pairs = [(a, b) for a in signal for b in signal if a <= b]
    first_out = 1 + n_signal + n_noise
    outputs = list(range(first_out, first_out + len(pairs)))
    return {
        "readoff": 0,
        "signal": signal,
        "noise": noise,
        "outputs": outputs,
        "pairs": pairs,
        "d_vocab": first_out + len(pairs),
    }


def ov_coherent_dataset(
    n_samples: int,
    n_positions: int = 10,
    seed: int = 0,
    n_signal: int = 4,
    n_noise: int = 7,
) -> ToyDataset:
    """``[A] ... [B] ... [readoff] -> C(A, B)``: the OV-coherent task of Greenspan & Wynroe.

    Each sequence holds two signal tokens A and B (drawn independently from
    ``1 .. n_signal``, so A = B happens) at two distinct random positions, noise tokens
    everywhere else, and the read-off token 0 last. The answer, asked at the read-off position
    only, is the output token of the unordered pair {A, B} (10 outputs for 4 signals). One
    vocabulary holds inputs and outputs (12 + 10 = 22 tokens by default), so the toy model's
    embedding and unembedding stay one-hot.

    Args:
        n_samples: number of sequences.
        n_positions: sequence length, read-off included (>= 3).
        seed: seed of the ``torch.Generator``.
        n_signal, n_noise: token counts (Greenspan & Wynroe: 4 and 7).

    Returns:
        A :class:`ToyDataset` with one instance per sample: ``a_pos`` / ``b_pos`` the earlier
        and later signal position, ``query_pos`` the read-off, task = pair index.

    Raises:
        ValueError: fewer than 3 positions, fewer than 2 signal tokens, or no noise token.
    """
    _check_counts(n_samples, n_positions, 3)
    if n_signal < 2 or n_noise < 1:
        raise ValueError(f"need >= 2 signal and >= 1 noise tokens, got {n_signal}, {n_noise}")
    vocab = ov_coherent_vocab(n_signal, n_noise)
    g = torch.Generator().manual_seed(seed)
    body = n_positions - 1
    tokens = torch.randint(
        vocab["noise"][0], vocab["noise"][-1] + 1, (n_samples, n_positions), generator=g
    )
    slots = torch.argsort(torch.rand(n_samples, body, generator=g), dim=1)[:, :2]
    slots = torch.sort(slots, dim=1).values
    signal = torch.randint(1, n_signal + 1, (n_samples, 2), generator=g)
    rows = torch.arange(n_samples)
    tokens[rows, slots[:, 0]] = signal[:, 0]
    tokens[rows, slots[:, 1]] = signal[:, 1]
    tokens[:, -1] = vocab["readoff"]

    lo, hi = signal.min(dim=1).values, signal.max(dim=1).values
    pair_index = torch.full((n_signal + 1, n_signal + 1), -1, dtype=torch.long)
    for i, (a, b) in enumerate(vocab["pairs"]):
        pair_index[a, b] = i
    pair = pair_index[lo, hi]
    targets = torch.full_like(tokens, -1)
    task = torch.full_like(tokens, -1)
    targets[:, -1] = torch.tensor(vocab["outputs"])[pair]
    task[:, -1] = pair
    query = torch.full_like(rows, n_positions - 1)
    instances = torch.stack([rows, slots[:, 0], slots[:, 1], query, pair], dim=1)
    names = [f"{{{a},{b}}}->{o}" for (a, b), o in zip(vocab["pairs"], vocab["outputs"])]
    params = {"n_samples": n_samples, "n_positions": n_positions, "seed": seed}
    return ToyDataset(
        tokens,
        targets,
        task,
        instances,
        names,
        vocab["d_vocab"],
        "ov_coherent",
        {**params, **vocab},
    )


# --------------------------------------------------------------------------- overlapping copy


def overlap_copy_vocab(n_tasks: int = 3, group_size: int = 3, n_noise: int = 6) -> dict[str, Any]:
    """Token layout of :func:`overlap_copy_dataset`.

    Returns:
        ``{"content": [[...] per task], "trigger": [...], "noise": [...], "BOS": ...,
        "d_vocab": ...}``: task ``t`` copies one of ``content[t]`` when ``trigger[t]`` asks.
    """
    content = [list(range(t * group_size, (t + 1) * group_size)) for t in range(n_tasks)]
    first = n_tasks * group_size
    trigger = list(range(first, first + n_tasks))
    noise = list(range(first + n_tasks, first + n_tasks + n_noise))
    bos = first + n_tasks + n_noise
    return {
        "content": content,
        "trigger": trigger,
        "noise": noise,
        "BOS": bos,
        "d_vocab": bos + 1,
    }


def overlap_copy_dataset(
    n_samples: int,
    n_positions: int = 8,
    seed: int = 0,
    n_tasks: int = 3,
    group_size: int = 3,
    n_noise: int = 6,
) -> ToyDataset:
    """Copy tasks that each need ``2 x d_head`` dimensions ("overlapping necessary superposition").

    Task ``t`` owns ``group_size`` content tokens and a trigger token. A sequence is BOS, noise
    tokens with one content token of a random task ``t`` at a random position, and the trigger
    of ``t`` last; the answer at the trigger is the content token (a copy). A head with
    ``d_head = 1`` writes a multiple of one direction, so it can tell at most two of three
    content tokens apart: each task needs two such heads. With three heads the tasks can share
    them as pairs (1&2, 2&3, 3&1); a within-layer gate penalty counts the same co-attention
    (two heads per query/key pair) for that solution and for one with disjoint pairs.

    Args:
        n_samples: number of sequences.
        n_positions: length, BOS and trigger included (>= 3).
        seed: seed of the ``torch.Generator``.
        n_tasks, group_size, n_noise: task count, content tokens per task, noise tokens.

    Returns:
        A :class:`ToyDataset`; one instance per sample (``a_pos`` the content token,
        ``b_pos`` = ``query_pos`` the trigger, task ``t``).

    Raises:
        ValueError: bad counts.
    """
    _check_counts(n_samples, n_positions, 3)
    if n_tasks < 1 or group_size < 2 or n_noise < 1:
        raise ValueError("need n_tasks >= 1, group_size >= 2 and n_noise >= 1")
    vocab = overlap_copy_vocab(n_tasks, group_size, n_noise)
    g = torch.Generator().manual_seed(seed)
    noise = torch.tensor(vocab["noise"])
    tokens = noise[torch.randint(0, n_noise, (n_samples, n_positions), generator=g)]
    tokens[:, 0] = vocab["BOS"]
    t = torch.randint(0, n_tasks, (n_samples,), generator=g)
    member = torch.randint(0, group_size, (n_samples,), generator=g)
    pos = torch.randint(1, n_positions - 1, (n_samples,), generator=g)
    rows = torch.arange(n_samples)
    content = t * group_size + member
    tokens[rows, pos] = content
    tokens[:, -1] = torch.tensor(vocab["trigger"])[t]
    targets = torch.full_like(tokens, -1)
    task = torch.full_like(tokens, -1)
    targets[:, -1] = content
    task[:, -1] = t
    last = torch.full_like(rows, n_positions - 1)
    instances = torch.stack([rows, pos, last, last, t], dim=1)
    names = [f"copy{i + 1}" for i in range(n_tasks)]
    params = {"n_samples": n_samples, "n_positions": n_positions, "seed": seed}
    return ToyDataset(
        tokens,
        targets,
        task,
        instances,
        names,
        vocab["d_vocab"],
        "overlap_copy",
        {**params, **vocab},
    )
