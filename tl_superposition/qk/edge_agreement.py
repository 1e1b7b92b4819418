"""Feature-level edges beside the SVD trace's edges of the same firings.

The SVD trace (:mod:`tl_superposition.tracing`) says which upstream heads write the singular
components that make a firing: its circuit edges ``U -> D`` (``circuit.json``), each on the
query (``dest``) or key (``src``) side. A QK transcoder says the same thing through features:
:func:`~.feature_edges.feature_edges` splits each active feature's pre-activation over the
upstream writes. :func:`edge_agreement` puts the two side by side on the trace's own firings
(the discovery prompts the circuit was built on: the SVD edges exist only there):

- for every firing (up to ``max_firings`` per circuit node whose layer has a transcoder) and
  side, the **major features**: active features whose part of the score is at least
  ``min_feature_frac`` of the side's total ``|feature_score|``;
- each major feature's **carrier head** under a rule: ``"top"``, the head with the largest
  positive write into its pre-activation; ``"majority"``, a head whose write is more than half
  the pre-activation (none when MLPs, the embedding or the biases carry it);
- **SVD -> feature agreement**: the share of (circuit edge ``U -> D``, firing of ``D`` in
  which the trace recorded that edge) where ``U`` carries a major feature of that side;
- **feature -> SVD agreement**: the share of major features whose carrier head is the
  upstream of a circuit edge into ``D`` on that side (features without a carrier count as
  disagreements: their writer is not a head).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_superposition.circuit import Circuit
from tl_superposition.core.atomic import atomic_path, write_json_atomic
from tl_superposition.core.reading import read_json
from tl_superposition.qk.feature_edges import feature_edges
from tl_superposition.qk.transcoder import QKTranscoder
from tl_superposition.tracing.cache import run_batch

RULES = ("top", "majority")
#: The trace's side names -> :func:`~.feature_edges.feature_edges`'s.
SIDE = {"dest": "query", "src": "key"}


def carrier_heads(
    edges: pd.DataFrame, rule: str = "top", min_feature_frac: float = 0.1
) -> pd.DataFrame:
    """The major features of one firing's :func:`~.feature_edges.feature_edges` and the head
    that carries each (module docstring).

    Returns:
        One row per major feature: side, feature, act, feature_score, carrier (``"L.H"``, or
        ``None`` where no head carries it under ``rule``), carrier_write (its write, in
        pre-activation units; NaN where none).

    Raises:
        ValueError: an unknown ``rule``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    cols = ["side", "feature", "act", "feature_score", "carrier", "carrier_write"]
    if not len(edges):
        return pd.DataFrame(columns=cols)
    features = pd.DataFrame(edges.drop_duplicates(["side", "feature"]))
    features = pd.DataFrame(features[["side", "feature", "act", "feature_score"]])
    total = features.feature_score.abs().groupby(features.side).transform("sum")
    major = pd.DataFrame(features[features.feature_score.abs() >= min_feature_frac * total])
    heads = edges[edges.up_kind == "attn"]
    best = heads.loc[heads.groupby(["side", "feature"]).write.idxmax()]
    best = best[["side", "feature", "upstream", "write"]].rename(
        columns={"upstream": "carrier", "write": "carrier_write"}
    )
    out = major.merge(best, on=["side", "feature"], how="left")
    needed = out.act / 2 if rule == "majority" else 0.0
    keep = out.carrier_write > needed
    out["carrier"] = pd.Series(
        [c if k else None for c, k in zip(out.carrier, keep)], index=out.index, dtype=object
    )
    out["carrier_write"] = out.carrier_write.where(keep, np.nan)
    return pd.DataFrame(out[cols]).reset_index(drop=True)


@dataclass
class EdgeAgreement:
    """What :func:`edge_agreement` found.

    Attributes:
        svd_edges: one row per (circuit edge, firing of its downstream node where the trace
            recorded it): up, down, side (``query``/``key``), up_head (``"L.H"``), firing_id,
            svd_weight (the trace's edge weight in that firing), and per rule a bool column
            ``supported_<rule>`` (the head carries a major feature of that side).
        features: one row per (firing, major feature): down, firing_id, side, feature, act,
            feature_score, and per rule ``carrier_<rule>`` and ``in_svd_<rule>`` (the carrier
            is the upstream of a circuit edge into ``down`` on that side).
        n_firings: firings decomposed.
    """

    svd_edges: pd.DataFrame
    features: pd.DataFrame
    n_firings: int

    def summary(self) -> dict[str, Any]:
        """Per rule: ``svd_in_features`` and ``features_in_svd`` (the two shares), the counts
        they are shares of, and ``n_firings``."""
        out: dict[str, Any] = {"n_firings": self.n_firings}
        for rule in RULES:
            out[rule] = {
                "svd_in_features": _mean(self.svd_edges, f"supported_{rule}"),
                "features_in_svd": _mean(self.features, f"in_svd_{rule}"),
                "n_svd_edge_firings": int(len(self.svd_edges)),
                "n_major_features": int(len(self.features)),
            }
        return out

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write ``edge_agreement_svd_edges.csv``, ``edge_agreement_features.csv`` and
        ``edge_agreement.json`` (``n_firings``) into ``out_dir``, each atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, table in (("svd_edges", self.svd_edges), ("features", self.features)):
            with atomic_path(out / f"edge_agreement_{name}.csv") as tmp:
                table.to_csv(tmp, index=False)
        write_json_atomic(out / "edge_agreement.json", {"n_firings": self.n_firings})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EdgeAgreement:
        """What :meth:`save` wrote (head labels stay strings: ``"20.0"``, not ``20.0``).

        Raises:
            FileNotFoundError: a file is missing.
        """
        folder = Path(folder)
        names = ["up", "down", "up_head", "side", *(f"carrier_{rule}" for rule in RULES)]
        labels: dict[Hashable, Any] = dict.fromkeys(names, "object")
        svd = pd.read_csv(folder / "edge_agreement_svd_edges.csv", dtype=labels)
        features = pd.read_csv(folder / "edge_agreement_features.csv", dtype=labels)
        for rule in RULES:
            carriers = [c if isinstance(c, str) else None for c in features[f"carrier_{rule}"]]
            features[f"carrier_{rule}"] = pd.Series(carriers, index=features.index, dtype=object)
        n = read_json(folder / "edge_agreement.json")["n_firings"]
        return cls(svd_edges=svd, features=features, n_firings=int(n))

    def disagreements(self, rule: str = "top", n: int = 10) -> dict[str, pd.DataFrame]:
        """What disagrees most often under ``rule``.

        Returns:
            ``{"svd_only": circuit edges whose head carries no major feature (up, down, side,
            firings, unsupported share), "feature_only": carriers outside the circuit's
            edges into that node (down, side, carrier, major features; ``"none"`` as
            carrier: carried by MLPs, the embedding or biases)}``, each the ``n`` most
            frequent.
        """
        supported = self.svd_edges[f"supported_{rule}"].to_numpy(dtype=bool)
        e = self.svd_edges.assign(unsupported=~supported)
        svd_only = pd.DataFrame(
            e.groupby(["up", "down", "side"], as_index=False).agg(
                firings=("firing_id", "size"), unsupported=("unsupported", "mean")
            )
        )
        svd_only = svd_only.sort_values(["unsupported", "firings"], ascending=False)
        f = pd.DataFrame(self.features[~self.features[f"in_svd_{rule}"].to_numpy(dtype=bool)])
        f["carrier"] = [c if isinstance(c, str) else "none" for c in f[f"carrier_{rule}"]]
        feature_only = pd.DataFrame(
            f.groupby(["down", "side", "carrier"], as_index=False).agg(
                major_features=("feature", "size")
            )
        )
        feature_only = feature_only.sort_values("major_features", ascending=False)
        return {
            "svd_only": pd.DataFrame(svd_only.head(n)).reset_index(drop=True),
            "feature_only": pd.DataFrame(feature_only.head(n)).reset_index(drop=True),
        }


def _mean(table: pd.DataFrame, col: str) -> float:
    return float(table[col].to_numpy(dtype=float).mean()) if len(table) else float("nan")


def _prompt_tokens(model: HookedTransformer, prompts: pd.DataFrame) -> dict[int, torch.Tensor]:
    """Each trace prompt's tokens (``prompts.csv`` text, no BOS: as the trace made them).

    Raises:
        ValueError: the tokens at IO and S1 are not the recorded names (another tokenizer).
    """
    out = {}
    for row in prompts.to_dict("records"):
        tokens = model.to_tokens(str(row["text"]), prepend_bos=False)[0]
        for pos, name in ((row["io_pos"], row["io"]), (row["s1_pos"], row["s"])):
            got = str(model.to_string(tokens[int(pos)])).strip()
            if got != str(name):
                raise ValueError(
                    f"prompt {row['prompt_id']}: token {pos} is {got!r}, the trace recorded "
                    f"{name!r}: the trace was made with another model or tokenizer"
                )
        out[int(row["prompt_id"])] = tokens
    return out


def _node_firings(firings: pd.DataFrame, node: dict[str, Any], max_firings: int) -> pd.DataFrame:
    """The traced firings of a circuit node, one per prompt, at most ``max_firings``."""
    f = pd.DataFrame(
        firings[
            (firings.layer == node["layer"])
            & (firings["head"] == node["head"])
            & (firings.dest_role == node["dest_role"])
            & (firings.src_role == node["src_role"])
            & firings.traced
        ]
    )
    first = ~f.prompt_id.duplicated()
    return pd.DataFrame(f[first.to_numpy()].head(max_firings)).assign(down=node["node"])


def edge_agreement(
    transcoders: Mapping[int, QKTranscoder] | Sequence[QKTranscoder],
    model: HookedTransformer,
    trace_dir: str | os.PathLike,
    max_firings: int = 8,
    min_feature_frac: float = 0.1,
    progress: bool = True,
) -> EdgeAgreement:
    """Compare feature-level and SVD edges on the trace's firings (module docstring).

    Args:
        transcoders: QK transcoders of one or several layers (a mapping by layer, or a list).
        model: the traced model.
        trace_dir: a ``trace-ioi`` output folder with the circuit (``circuit.json``,
            ``prompts.csv``, ``firings.parquet``, ``edge_records.parquet``).
        max_firings: firings decomposed per circuit node (each from another prompt).
        min_feature_frac: a major feature carries at least this share of its side's total
            ``|feature_score|``.
        progress: show a tqdm bar over firings.

    Returns:
        An :class:`EdgeAgreement` over the circuit's attention nodes in the transcoders'
        layers.

    Raises:
        FileNotFoundError: a file of the trace folder is missing.
        ValueError: no circuit node lies in the transcoders' layers, none of them has a traced
            firing, or the prompts do not tokenise as the trace recorded (another model).
    """
    qkts = dict(transcoders) if isinstance(transcoders, Mapping) else {
        q.shape.layer: q for q in transcoders
    }  # fmt: skip
    trace = Path(trace_dir)
    for name in ("circuit.json", "prompts.csv", "firings.parquet", "edge_records.parquet"):
        if not (trace / name).is_file():
            raise FileNotFoundError(f"{trace} lacks {name}: give a trace-ioi output folder")
    circuit = Circuit.load(trace)
    nodes, edges = _circuit_parts(circuit, list(qkts))
    if not len(nodes):
        raise ValueError(f"no node of the circuit in {trace} lies in layers {sorted(qkts)}")
    firings = pd.read_parquet(trace / "firings.parquet")
    records = pd.read_parquet(trace / "edge_records.parquet")
    chosen = [
        f
        for n in nodes.to_dict("records")
        for f in _node_firings(firings, n, max_firings).to_dict("records")
    ]
    tokens = _prompt_tokens(model, pd.read_csv(trace / "prompts.csv"))
    svd_rows, feature_rows = [], []
    chosen.sort(key=lambda f: int(f["prompt_id"]))  # one forward pass per prompt
    cache, cached = None, -1
    for f in tqdm(chosen, desc="edge agreement", disable=not progress):
        prompt = int(f["prompt_id"])
        if prompt != cached:
            cache, cached = run_batch(model, tokens[prompt][None].to(model.cfg.device)), prompt
        fe = feature_edges(
            qkts[int(f["layer"])], model, tokens[prompt], int(f["head"]), int(f["dest_pos"]),
            int(f["src_pos"]), cache=cache,
        )  # fmt: skip
        carriers = {rule: carrier_heads(fe, rule, min_feature_frac) for rule in RULES}
        into = pd.DataFrame(edges[edges.down == f["down"]])
        svd_rows.append(_svd_rows(into, records, f, carriers))
        feature_rows.append(_feature_rows(into, f, carriers))
    if not chosen:
        raise ValueError(f"the trace in {trace} holds no traced firing of the circuit's nodes")
    return EdgeAgreement(
        svd_edges=pd.concat(svd_rows, ignore_index=True),
        features=pd.concat(feature_rows, ignore_index=True),
        n_firings=len(chosen),
    )


def _circuit_parts(circuit: Circuit, layers: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The circuit's attention nodes in ``layers``, and its head -> head edges into them
    (with ``up_head`` ``"L.H"`` and ``side`` ``query``/``key``)."""
    nodes = circuit.circuit_nodes
    nodes = pd.DataFrame(nodes[(nodes.kind == "attn") & nodes.layer.isin(layers)])
    table = circuit.nodes.set_index("node")
    heads = {
        str(node): f"{layer}.{head}"
        for node, kind, layer, head in zip(table.index, table.kind, table.layer, table["head"])
        if kind == "attn"
    }
    edges = circuit.circuit_edges
    edges = pd.DataFrame(edges[edges.up.isin(list(heads)) & edges.down.isin(list(nodes.node))])
    edges["up_head"] = [heads[u] for u in edges.up]
    edges["side"] = [SIDE[s] for s in edges.side]
    return nodes, edges


def _svd_rows(
    into: pd.DataFrame,
    records: pd.DataFrame,
    f: dict[str, Any],
    carriers: dict[str, pd.DataFrame],
) -> pd.DataFrame:
    """The circuit edges into ``f``'s node recorded in firing ``f``, with their support."""
    rec = records[records.firing_id == f["firing_id"]]
    rec_heads = {
        (SIDE[s], f"{L}.{h}"): w
        for s, L, h, w in zip(rec.side, rec.up_layer, rec.up_head, rec.weight)
    }
    rows = []
    for e in into.to_dict("records"):
        weight = rec_heads.get((e["side"], e["up_head"]))
        if weight is None:
            continue
        row = {key: e[key] for key in ("up", "down", "side", "up_head")}
        row.update(firing_id=int(f["firing_id"]), svd_weight=float(weight))
        for rule, c in carriers.items():
            mine = (c.side == e["side"]) & (c.carrier == e["up_head"])
            row[f"supported_{rule}"] = bool(mine.to_numpy().any())
        rows.append(row)
    columns = ["up", "down", "side", "up_head", "firing_id", "svd_weight"]
    return pd.DataFrame(rows, columns=columns + [f"supported_{rule}" for rule in carriers])


def _feature_rows(
    into: pd.DataFrame, f: dict[str, Any], carriers: dict[str, pd.DataFrame]
) -> pd.DataFrame:
    """The major features of firing ``f`` and whether their carriers are circuit edges."""
    circuit_heads = set(zip(into.side, into.up_head))
    base = pd.DataFrame(carriers[RULES[0]][["side", "feature", "act", "feature_score"]])
    base.insert(0, "firing_id", int(f["firing_id"]))
    base.insert(0, "down", f["down"])
    for rule, c in carriers.items():
        base[f"carrier_{rule}"] = c.carrier.to_numpy()
        base[f"in_svd_{rule}"] = [
            (side, carrier) in circuit_heads for side, carrier in zip(c.side, c.carrier)
        ]
    return base
