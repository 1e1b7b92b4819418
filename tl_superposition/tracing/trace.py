"""Signal tracing through attention firings, on any prompts, in one forward pass.

Follows Franco & Crovella 2024 (arXiv 2410.00340, Sec. 5). :func:`trace` runs the model once
over the prompts, batch by batch. Per batch, :func:`~.cache.run_batch` keeps what the steps
read (hooks copying into memory reused by every batch, up to the last block, no
unembedding); the seed chooser (:mod:`.seeds`) sees the batch; then

1. :func:`~.decompose.decompose_batch` finds every firing of every head, decomposes its
   score into singular-component contributions, keeps the shortest set reaching
   ``thresh x score`` and its signal directions, and decomposes a sample of non-firings;
2. :func:`~.walk.walk_batch` walks the batch from the chooser's candidate seeds down the
   layers: for each reached firing it measures how much every upstream head, MLP and the
   embeddings write into each side's signal (:mod:`.writes`: the source position through
   the key, ``side="src"``; the destination through the query, ``side="dest"``), applies
   the edge rule to the head writes (:mod:`.edges`), and passes reachability on to the
   firings of the selected heads at that position.

The batch's rows are streamed to parquet as soon as they are found
(:class:`~.store.TraceStore`), so memory does not grow with the number of prompts. Once
every batch is done the chooser gives the seeds; reachability is kept per candidate seed, so
the traced firings are those reached from the chosen ones. A batch whose candidates missed a
chosen seed (the ranking changed after it was walked) is run and walked again from the
seeds: the only second pass, and only of that batch.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.core import distributed
from tl_superposition.tracing.cache import BatchCache, Workspace, run_batch
from tl_superposition.tracing.config import TraceConfig
from tl_superposition.tracing.decompose import BatchFirings, decompose_batch
from tl_superposition.tracing.graph import build_graph, paper_graph
from tl_superposition.tracing.qk_svd import QKSVDCache
from tl_superposition.tracing.seeds import FixedSeeds, SeedChooser
from tl_superposition.tracing.store import TraceStore
from tl_superposition.tracing.walk import WalkResult, seed_firings, walk_batch
from tl_superposition.tracing.writes import ResidualWriters

# Bit of the reach masks that marks firings reached from the final seeds in a batch walked
# again (:func:`trace`); bits 0 .. FINAL_BIT - 1 number the candidate seeds.
FINAL_BIT = 62


@dataclass
class TraceResult:
    """What :func:`trace` found: files in ``out_dir``, read into pandas on first access.

    Attributes:
        out_dir: the folder holding the files (a temporary folder, removed with this object,
            when :func:`trace` was given none).
        seeds: the seed heads.
        config: the hyperparameters.
        seconds: wall time of the trace.
        model_name: ``model.cfg.model_name``.
        stats: counts written by :meth:`TraceStore.finalize` (``n_firings``,
            ``n_traced_firings``, ``n_edges``, ``n_edge_records``, ``n_nonfirings``,
            ``max_abs_residual``, ``median_n_components``).
        qk: the QK decompositions used (pass them to later traces or interventions on the
            same model).
    """

    out_dir: Path
    seeds: list[tuple[int, int]]
    config: TraceConfig
    seconds: float
    model_name: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    tmpdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    qk: QKSVDCache | None = field(default=None, repr=False)

    def path(self, name: str) -> Path:
        """The path of file ``name`` of the trace (see :data:`TraceStore.FILES`)."""
        return self.out_dir / name

    @cached_property
    def firings(self) -> pd.DataFrame:
        """Every firing (``firings.parquet``, see :meth:`TraceStore.firing_table`)."""
        return pd.read_parquet(self.path(TraceStore.FIRINGS))

    @cached_property
    def edges(self) -> pd.DataFrame:
        """Head-to-head edges aggregated over traced firings (``edges.csv``)."""
        return pd.read_csv(self.path(TraceStore.EDGES))

    @cached_property
    def edge_records(self) -> pd.DataFrame:
        """One row per edge of a traced firing (``edge_records.parquet``)."""
        return pd.read_parquet(self.path(TraceStore.EDGE_RECORDS))

    @cached_property
    def writers(self) -> pd.DataFrame:
        """MLP and embedding writes into traced firings, aggregated (``writers.csv``)."""
        return pd.read_csv(self.path(TraceStore.WRITERS))

    @cached_property
    def heads(self) -> pd.DataFrame:
        """One row per head: firing counts and median components (``heads.csv``)."""
        return pd.read_csv(self.path(TraceStore.HEADS))

    @cached_property
    def nonfirings(self) -> pd.DataFrame:
        """The decomposed sample of non-firings (``nonfirings.parquet``)."""
        return pd.read_parquet(self.path(TraceStore.NONFIRINGS))

    def graph(self, min_firings: int = 1) -> nx.MultiDiGraph:
        """The communication graph (:func:`~tl_superposition.tracing.graph.build_graph`)."""
        return build_graph(self.heads, self.edges, self.seeds, min_firings)

    def paper_graph(self) -> nx.DiGraph:
        """The graph in the authors' shape (:func:`~tl_superposition.tracing.graph.paper_graph`)."""
        return paper_graph(self.edge_records, self.firings, self.config.first_layer)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Copy the trace's files into ``out_dir`` (atomically) and write ``graph.graphml``.

        Returns:
            ``{file name: path}``.
        """
        return TraceStore.copy(self.out_dir, Path(out_dir), self.graph())


def _check_positions(
    name: str, positions: Tensor, lengths: Tensor, absent_ok: bool = False
) -> Tensor:
    positions = positions.cpu()
    if positions.shape != lengths.shape:
        raise ValueError(
            f"{name} must hold one position per prompt ({len(lengths)}), got shape "
            f"{tuple(positions.shape)}"
        )
    low = -1 if absent_ok else 0
    if (positions >= lengths).any() or (positions < low).any():
        raise ValueError(f"{name} has a position outside its prompt")
    return positions


def _seed_chooser(seeds: Any, n_layers: int, n_heads: int) -> SeedChooser:
    if isinstance(seeds, SeedChooser):
        return seeds
    return FixedSeeds.from_spec(seeds, n_layers, n_heads)


class SeedBits:
    """Bit numbers of candidate seed heads (one per head, at most :data:`FINAL_BIT`)."""

    def __init__(self) -> None:
        self.bit: dict[tuple[int, int], int] = {}

    def assign(self, heads: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
        """The ``(head, bit)`` of each head, numbering new heads while bits are left."""
        out = []
        for head in heads:
            if head not in self.bit and len(self.bit) < FINAL_BIT:
                self.bit[head] = len(self.bit)
            if head in self.bit:
                out.append((head, self.bit[head]))
        return out

    def mask(self, heads: Sequence[tuple[int, int]]) -> int:
        """The bits of ``heads`` (those that have one)."""
        return sum(1 << self.bit[h] for h in heads if h in self.bit)


def start_bits(
    firings: BatchFirings,
    heads: Sequence[tuple[tuple[int, int], int]],
    seed_dest: np.ndarray,
    seed_src: np.ndarray | None,
) -> np.ndarray:
    """Per firing of a batch, the bits of the seed heads it is a seed firing of.

    Args:
        firings: the batch's firings.
        heads: ``((layer, head), bit)`` of each seed head.
        seed_dest, seed_src: per prompt of the batch, the seed positions.
    """
    cols = [getattr(firings, k).numpy() for k in ("prompt", "layer", "head", "dest", "src")]
    bits = np.zeros(len(firings), dtype=np.int64)
    for head, bit in heads:
        is_seed = seed_firings(*cols[:5], [head], seed_dest, seed_src)  # type: ignore[misc]
        bits[is_seed] |= np.int64(1) << bit
    return bits


@dataclass
class _Batch:
    """One batch's results, before they are stored."""

    firings: BatchFirings
    nonfirings: BatchFirings
    walk: WalkResult
    own_seeds: bool = False


def _run(
    qk: QKSVDCache,
    writers: ResidualWriters,
    cache: BatchCache,
    lengths: Tensor,
    prompt_ids: Tensor,
    heads: Sequence[tuple[tuple[int, int], int]],
    seeds: tuple[np.ndarray, np.ndarray | None],
    cfg: TraceConfig,
    workspace: Workspace,
    chooser: SeedChooser,
    positions: Tensor | None,
) -> _Batch:
    """Decompose one batch and walk it from ``heads``, or from the chooser's own seed
    firings (steps 1 and 2)."""
    firings, nonfirings = decompose_batch(qk, cache, lengths, cfg, prompt_ids, positions)
    own = chooser.seed_firings(firings, int(prompt_ids[0]))
    # per-prompt seed firings are final at once: they take the final seeds' bit
    start = start_bits(firings, heads, *seeds) if own is None else own.astype(np.int64) << FINAL_BIT
    walk = walk_batch(qk, writers, cache, firings, start, cfg, workspace)
    return _Batch(firings, nonfirings, walk, own_seeds=own is not None)


@torch.no_grad()
def trace(
    model: HookedTransformer,
    tokens: Int[Tensor, "n_prompts pos"],
    seeds: Iterable[Any] | str | SeedChooser,
    seed_dest: Int[Tensor, " n_prompts"],
    seed_src: Int[Tensor, " n_prompts"] | None = None,
    lengths: Int[Tensor, " n_prompts"] | None = None,
    config: TraceConfig | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
    roles: Mapping[str, Tensor] | None = None,
    qk: QKSVDCache | None = None,
    positions: Bool[Tensor, "n_prompts pos"] | None = None,
) -> TraceResult:
    """Decompose every firing and trace signals upstream from seed firings, in one pass.

    Args:
        model: a ``HookedTransformer`` with folded normalisation weights (see
            :func:`tl_superposition.load_model`); absolute or rotary positions, MHA or GQA.
        tokens: right-padded prompts.
        seeds: heads ``[(layer, head), ...]`` (or ``"9.6,9.9"``, see
            :func:`~tl_superposition.tracing.graph.parse_heads`) whose firings start the
            trace, or a :class:`~tl_superposition.tracing.seeds.SeedChooser` that picks them
            from the same forward pass.
        seed_dest: per prompt, the destination position of the seed firings (IOI: END).
        seed_src: per prompt, the required source position (IOI: IO); ``None`` accepts any.
        lengths: real length of each prompt (default: all of ``tokens``).
        config: thresholds, edge rule and batch size (:class:`TraceConfig`).
        progress: show a tqdm bar over batches.
        out_dir: folder the files are streamed to (created if missing; files already there
            are replaced only once the trace is complete). ``None``: a temporary folder that
            lives as long as the result.
        roles: named positions per prompt (``{"IO": io_pos, ...}``, -1 where a prompt has
            none): the firings table gets ``dest_role`` and ``src_role`` columns (where two
            roles name a position, the later one in ``roles``).
        qk: the QK decompositions of ``model`` to use and extend (default: a new
            :class:`~tl_superposition.tracing.qk_svd.QKSVDCache`). Pass one cache to every
            trace of a model (several prompt sets, both edge rules) and each head's form is
            decomposed once, by the first trace that needs it.

    Returns:
        :class:`TraceResult`; its files are described by
        :class:`~tl_superposition.tracing.store.TraceStore`.

    Raises:
        ValueError: a seed head or a seed position is out of range, no prompts, or ``qk``
            is not that of ``model`` as it is now (:meth:`QKSVDCache.check_model`).
        NotImplementedError: an attention variant the decomposition does not cover.
    """
    cfg = config or TraceConfig()
    chooser = _seed_chooser(seeds, model.cfg.n_layers, model.cfg.n_heads)
    world = distributed.current()
    if world.distributed and not chooser.final_per_batch:
        raise ValueError(
            "seeds chosen over all prompts (DLA) are traced in one process: run it without "
            "torchrun, or give per-prompt or fixed seeds"
        )
    n_prompts = tokens.shape[0]
    if n_prompts == 0:
        raise ValueError("trace needs at least one prompt")
    lengths = torch.full((n_prompts,), tokens.shape[1]) if lengths is None else lengths.cpu()
    dest = _check_positions("seed_dest", seed_dest, lengths).numpy()
    src = None if seed_src is None else _check_positions("seed_src", seed_src, lengths).numpy()
    role_pos = {
        k: _check_positions(f"roles[{k!r}]", v, lengths, absent_ok=True)
        for k, v in (roles or {}).items()
    }
    if positions is not None and positions.shape[0] != n_prompts:
        raise ValueError(
            f"positions must have one row per prompt ({n_prompts}), got {tuple(positions.shape)}"
        )
    if qk is None:
        qk = QKSVDCache(model, n_offsets=int(lengths.max()))
    else:
        qk.check_model(model)
    writers = ResidualWriters.from_model(model)
    workspace, cache_workspace = Workspace(), Workspace()
    device = next(model.parameters()).device
    tmpdir = tempfile.TemporaryDirectory(prefix="tl-trace-") if out_dir is None else None
    out = Path(tmpdir.name if tmpdir is not None else out_dir)  # type: ignore[arg-type]
    bits = SeedBits()
    # per batch, the candidate heads it was walked from (None: the chooser's own seed firings)
    walked: list[set[tuple[int, int]] | None] = []

    def run(lo: int, hi: int, heads: Sequence[tuple[tuple[int, int], int]], observe: bool):
        batch_tokens = tokens[lo:hi, : int(lengths[lo:hi].max())].to(device)
        cache = run_batch(model, batch_tokens, cache_workspace)
        if observe:
            chooser.observe(model, cache, lo, hi)
            heads = bits.assign(chooser.candidates())
        seeds_here = (dest[lo:hi], None if src is None else src[lo:hi])
        ids = torch.arange(lo, hi)
        pos = None if positions is None else positions[lo:hi, : batch_tokens.shape[1]].cpu()
        return heads, _run(
            qk, writers, cache, lengths[lo:hi], ids, heads, seeds_here, cfg, workspace, chooser,
            pos,
        )  # fmt: skip

    t0 = time.time()
    starts = list(range(0, n_prompts, cfg.batch_size))
    batches = _observed_batches(starts, n_prompts, cfg.batch_size, run, chooser, world, progress)
    if not world.main:  # a worker: its batches go to rank 0, which writes the files
        for _ in batches:
            pass
        return TraceResult(out, [], cfg, time.time() - t0, model.cfg.model_name,
                           {"worker_rank": world.rank}, tmpdir, qk)  # fmt: skip
    with TraceStore(out, model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head) as store:
        for lo, heads, batch in batches:
            store.add_batch(lo, batch.firings, batch.walk, batch.nonfirings, role_pos)
            walked.append(None if batch.own_seeds else {h for h, _ in heads})
        seed_heads = chooser.choose()
        again = [i for i, w in enumerate(walked) if w is not None and not set(seed_heads) <= w]
        for i in tqdm(again, desc="walk again", unit="batch", disable=not progress or not again):
            lo = starts[i]
            hi = min(lo + cfg.batch_size, n_prompts)
            final = [(h, FINAL_BIT) for h in seed_heads]
            _, batch = run(lo, hi, final, observe=False)
            store.replace_batch(i, batch.firings, batch.walk, role_pos)
        mask = bits.mask(seed_heads) | (1 << FINAL_BIT)
        stats = store.finalize(mask, again)
    stats["n_batches_walked_again"] = len(again)
    return TraceResult(
        out_dir=out,
        seeds=list(seed_heads),
        config=cfg,
        seconds=time.time() - t0,
        model_name=model.cfg.model_name,
        stats=stats,
        tmpdir=tmpdir,
        qk=qk,
    )


def _observed_batches(
    starts: list[int],
    n_prompts: int,
    batch_size: int,
    run: Any,
    chooser: SeedChooser,
    world: distributed.World,
    progress: bool,
) -> Iterator[tuple[int, Any, _Batch]]:
    """``(first prompt, heads, batch)`` of every batch, in prompt order.

    Under torchrun rank ``r`` runs batches ``r, r + n, ...``; each round's batches are gathered
    on rank 0 with what the chooser observed of them, and only rank 0 yields them (the seeds
    of such choosers depend on each batch alone, so the results equal one process's).
    """

    def bounds(i: int) -> tuple[int, int]:
        return starts[i], min(starts[i] + batch_size, n_prompts)

    rounds = range(0, len(starts), world.size)
    for first in tqdm(rounds, desc="trace", unit="batch", disable=not progress):
        mine = None
        if first + world.rank < len(starts):
            lo, hi = bounds(first + world.rank)
            heads, batch = run(lo, hi, [], observe=True)
            mine = (heads, batch, chooser.observed(lo, hi) if world.distributed else None)
        for j, got in enumerate(distributed.gather_to_main(mine, world)):
            if got is None:
                continue
            lo, hi = bounds(first + j)
            if j != world.rank:
                chooser.absorb(lo, hi, got[2])
            yield lo, got[0], got[1]


__all__ = [
    "TraceConfig",
    "TraceResult",
    "BatchCache",
    "run_batch",
    "decompose_batch",
    "walk_batch",
    "start_bits",
    "trace",
]
