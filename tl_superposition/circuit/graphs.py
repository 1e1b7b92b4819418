"""Per-prompt role graphs of a trace, and their unification over prompts (ACC++).

A node is a head at a pair of token roles, ``(layer, head, destination role, source role)``
(named ``A23.3:END>IO``), an MLP or the embeddings at a role (``M29:END``, ``E:END``, seeds
only), or the logits (``logits``). For one prompt (:func:`prompt_edges`):

- every seed of the prompt (:mod:`~tl_superposition.tracing.prompt_seeds`) is an edge into
  the logits, weighted by its direct logit attribution;
- every edge record of a traced firing (an upstream head ``U`` writing, at position ``p``, into
  the signal of one side of a downstream firing ``D``) is an edge from ``U``'s node at ``p`` to
  ``D``'s node, weighted by the write (score units). ``U``'s node takes the role of ``p`` and
  the role of the source ``U`` attends to most at ``p`` (for a head that fires at ``p``, its
  firing's source); sources without a role are named ``other``.

:func:`unify` then merges the prompts as ACC++ does (``graphs/unification.py``): a node is
kept when it appears in at least ``round(node_frac * n_prompts)`` prompt graphs, an edge
when both its ends are kept, with weight the sum over prompts divided by the number of
prompt graphs; nodes left without an edge are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import Tensor

ROOT = "logits"
OTHER_ROLE = "other"


def node_name(layer: int, head: int, dest_role: str, src_role: str) -> str:
    """``A{layer}.{head}:{dest_role}>{src_role}``, a head at a pair of roles."""
    return f"A{layer}.{head}:{dest_role}>{src_role}"


def parse_node(name: str) -> dict[str, object]:
    """The parts of a node name: ``kind`` (attn, mlp, embed, logits), ``layer``, ``head``,
    ``dest_role``, ``src_role`` (-1 and ``""`` where a kind has none).

    Raises:
        ValueError: not a node name of this module.
    """
    if name == ROOT:
        return {"kind": "logits", "layer": -1, "head": -1, "dest_role": "", "src_role": ""}
    try:
        comp, roles = name.split(":", 1)
        if comp.startswith("A"):
            layer, head = (int(x) for x in comp[1:].split("."))
            dest, src = roles.split(">", 1)
            return {
                "kind": "attn",
                "layer": layer,
                "head": head,
                "dest_role": dest,
                "src_role": src,
            }
        if comp.startswith("M"):
            return {"kind": "mlp", "layer": int(comp[1:]), "head": -1, "dest_role": roles,
                    "src_role": ""}  # fmt: skip
        if comp == "E":
            return {"kind": "embed", "layer": -1, "head": -1, "dest_role": roles, "src_role": ""}
    except ValueError:
        pass
    raise ValueError(f"not a circuit node name: {name!r} (expected e.g. 'A23.3:END>IO')")


def _names(layer, head, dest_role, src_role) -> list[str]:
    return [node_name(*x) for x in zip(layer, head, dest_role, src_role)]


def seed_edges(seeds: pd.DataFrame, roles: list[list[str]], end_role: str = "END") -> pd.DataFrame:
    """Edges from each per-prompt seed into the logits.

    Args:
        seeds: :meth:`~tl_superposition.tracing.prompt_seeds.PromptSeeds.table`.
        roles: per prompt and position, the role naming it (``""``: none).
        end_role: the role of the destination the seeds write at.

    Returns:
        prompt_id, up, down (``logits``), side (``logits``), weight (the attribution, in
        logits). Attention-output biases are not nodes and are left out.
    """
    rows = []
    cols = (seeds.prompt_id, seeds.kind, seeds.layer, seeds["head"], seeds.src, seeds.attribution)
    for prompt, kind, layer, head, src, value in zip(*cols):
        if kind == "head":
            up = node_name(layer, head, end_role, roles[prompt][src] or OTHER_ROLE)
        elif kind == "mlp":
            up = f"M{layer}:{end_role}"
        elif kind == "embed":
            up = f"E:{end_role}"
        else:
            continue
        rows.append((prompt, up, ROOT, "logits", float(value)))
    return pd.DataFrame(rows, columns=["prompt_id", "up", "down", "side", "weight"])


def prompt_edges(
    firings: pd.DataFrame,
    records: pd.DataFrame,
    main_source: np.ndarray,
    roles: list[list[str]],
) -> pd.DataFrame:
    """Every head-to-head edge of every prompt graph, one row per edge record.

    Args:
        firings: the traced firings (``firings.parquet`` rows with ``traced``): firing_id,
            layer, head, dest_role, src_role.
        records: ``edge_records.parquet`` (firing_id, prompt_id, side, pos, up_layer,
            up_head, weight).
        main_source: ``[n_prompts, n_layers, n_heads, pos]`` the source each head attends to
            most at each destination (its ``hook_pattern`` argmax).
        roles: per prompt and position, the role naming it (``""``: none).

    Returns:
        The records with ``up`` and ``down`` node names. Records at a position without a
        role, or into a firing without both roles, are dropped: ACC++ traces named positions
        only (a trace kept to them, the IOI default, has no such records).
    """
    down = firings.set_index("firing_id")[["layer", "head", "dest_role", "src_role"]]
    rec = records.join(down, on="firing_id", rsuffix="_down")
    p, pos = rec.prompt_id.to_numpy(), rec.pos.to_numpy()
    src = main_source[p, rec.up_layer.to_numpy(), rec.up_head.to_numpy(), pos]
    pos_role = [roles[i][j] for i, j in zip(p, pos)]
    src_role = [roles[i][j] or OTHER_ROLE for i, j in zip(p, src)]
    rec = rec.assign(
        up=_names(rec.up_layer, rec.up_head, pos_role, src_role),
        down=_names(rec.layer, rec["head"], rec.dest_role, rec.src_role),
        pos_role=pos_role,
    )
    named = (np.array(pos_role, dtype=object) != "") & (rec.dest_role != "").to_numpy()
    named &= (rec.src_role != "").to_numpy()
    return pd.DataFrame(rec[named]).reset_index(drop=True)


@dataclass
class UnifiedGraph:
    """Prompt graphs merged over prompts (:func:`unify`).

    Attributes:
        nodes: node (name), n_prompts (prompt graphs it appears in), and the parts of
            :func:`parse_node`.
        edges: up, down, side, weight (summed over prompts / ``n_graphs``), n_prompts.
        n_graphs: the number of prompt graphs (prompts with seeds).
        min_node_prompts: the node threshold used.
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    n_graphs: int
    min_node_prompts: int


def unify(edges: pd.DataFrame, n_graphs: int, node_frac: float = 0.01) -> UnifiedGraph:
    """Merge per-prompt edges over prompts (ACC++'s unification, module docstring).

    Args:
        edges: per-prompt edges with prompt_id, up, down, side, weight (several rows of one
            prompt and edge are one edge of that prompt graph, with their mean weight).
        n_graphs: the number of prompt graphs (prompts that were seeded).
        node_frac: a node is kept in at least ``round(node_frac * n_graphs)`` prompt graphs
            (Python's ``round``, as ACC++).

    Raises:
        ValueError: ``n_graphs < 1`` or ``node_frac`` outside [0, 1].
    """
    if n_graphs < 1:
        raise ValueError(f"n_graphs must be >= 1, got {n_graphs}")
    if not 0 <= node_frac <= 1:
        raise ValueError(f"node_frac must be in [0, 1], got {node_frac}")
    keys = ["up", "down", "side"]
    per_prompt = edges.groupby([*keys, "prompt_id"], sort=False).weight.mean().reset_index()
    ends = pd.concat(
        [per_prompt[["up", "prompt_id"]].set_axis(["node", "prompt_id"], axis=1),
         per_prompt[["down", "prompt_id"]].set_axis(["node", "prompt_id"], axis=1)]
    )  # fmt: skip
    sizes = ends.drop_duplicates().groupby("node").size()
    counts = {str(k): int(v) for k, v in zip(sizes.index, sizes.to_numpy())}
    min_prompts = int(round(node_frac * n_graphs))
    kept = {n for n, c in counts.items() if c >= min_prompts} | {ROOT}
    both = per_prompt.up.isin(kept).to_numpy() & per_prompt.down.isin(kept).to_numpy()
    per_prompt = pd.DataFrame(per_prompt[both])
    merged = per_prompt.groupby(keys, sort=True).agg(
        weight=("weight", "sum"), n_prompts=("prompt_id", "nunique")
    )
    merged["weight"] /= n_graphs
    merged = merged.reset_index()
    used = sorted(set(merged.up) | set(merged.down))
    nodes = pd.DataFrame(
        [{"node": n, "n_prompts": counts.get(n, 0), **parse_node(n)} for n in used]
    )
    return UnifiedGraph(nodes=nodes, edges=merged, n_graphs=n_graphs, min_node_prompts=min_prompts)


def role_labels(
    roles: Mapping[str, np.ndarray | Tensor], n_prompts: int, n_pos: int
) -> list[list[str]]:
    """Per prompt and position, the role naming it (``""``: none); a later role of ``roles``
    wins where two name one position, as in the trace's tables.

    Args:
        roles: ``{role: [n_prompts] positions}``, -1 where a prompt has none.
        n_prompts, n_pos: the shape.
    """
    labels = [[""] * n_pos for _ in range(n_prompts)]
    for name, where in roles.items():
        for i, p in enumerate(np.asarray(where).tolist()):
            if 0 <= p < n_pos:
                labels[i][p] = name
    return labels
