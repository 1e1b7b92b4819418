"""Discovery and held-out IOI prompts, and their counterfactuals.

A circuit is found on one set of prompts and scored on another (MIB, Mueller et al. 2025,
arXiv 2504.13151, keeps its attribution and evaluation splits apart). Here the held-out
prompts differ in their generation seed *and* in their names: :func:`name_split` halves the
single-token names, :func:`ioi_split` draws each set from its own half, so no held-out
prompt repeats a discovery name.

The counterfactual of a prompt is Wang et al.'s ABC prompt (arXiv 2211.00593): the same
template with IO, S1 and S2 replaced by three other names (:func:`abc_tokens`), so that the
name-moving signal is gone while every position and the rest of the text stay.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_superposition.ioi import (
    NAMES,
    IOIDataset,
    PromptType,
    make_ioi_dataset,
    single_token_words,
)


def name_split(
    tokenizer_or_model: Any, names: Sequence[str] = NAMES
) -> tuple[list[str], list[str]]:
    """The single-token names of ``names`` split in two halves: ``(discovery, held_out)``.

    Names alternate between the halves in the order of ``names``, so both get a mix.

    Raises:
        ValueError: fewer than 10 single-token names (each half needs 5: two for a prompt and
            three others for its counterfactual).
    """
    tokenizer = getattr(tokenizer_or_model, "tokenizer", None) or tokenizer_or_model
    ok = single_token_words(tokenizer, names)
    if len(ok) < 10:
        raise ValueError(
            f"only {len(ok)} names are single tokens for this tokenizer; a discovery / "
            "held-out split needs at least 10"
        )
    return ok[0::2], ok[1::2]


def ioi_prompts(
    model: Any,
    n_prompts: int,
    seed: int,
    half: str = "discovery",
    prompt_type: PromptType = "mixed",
    prepend_bos: bool = False,
) -> IOIDataset:
    """IOI prompts from one half of the names (:func:`name_split`), which the dataset's
    ``meta["names"]`` records (its counterfactuals draw from the same half).

    Args:
        model: a ``HookedTransformer`` (or its tokenizer).
        n_prompts: the number of prompts.
        seed: their seed.
        half: ``"discovery"`` or ``"heldout"``.
        prompt_type, prepend_bos: as :func:`~tl_superposition.ioi.make_ioi_dataset`.

    Raises:
        ValueError: an unknown ``half``, or an error of ``make_ioi_dataset``.
    """
    halves = dict(zip(("discovery", "heldout"), name_split(model)))
    if half not in halves:
        raise ValueError(f"half must be 'discovery' or 'heldout', got {half!r}")
    names = halves[half]
    dataset = make_ioi_dataset(
        model, n_prompts, seed=seed, names=names, prompt_type=prompt_type, prepend_bos=prepend_bos
    )
    dataset.meta["names"] = names
    return dataset


def ioi_split(
    model: Any,
    n_discovery: int,
    n_heldout: int,
    seed: int = 0,
    heldout_seed: int | None = None,
    prompt_type: str = "mixed",
    prepend_bos: bool = False,
) -> tuple[IOIDataset, IOIDataset]:
    """Discovery prompts from one half of the names, held-out prompts from the other
    (:func:`ioi_prompts` of each half).

    Args:
        model: a ``HookedTransformer`` (or its tokenizer).
        n_discovery, n_heldout: the number of prompts of each set.
        seed: the discovery prompts' seed; heldout_seed: the held-out prompts' seed
            (default ``seed + 1``; it must differ from ``seed``).
        prompt_type, prepend_bos: as :func:`~tl_superposition.ioi.make_ioi_dataset`.

    Raises:
        ValueError: the same seed for both sets, or an error of ``make_ioi_dataset``.
    """
    heldout_seed = seed + 1 if heldout_seed is None else heldout_seed
    if heldout_seed == seed:
        raise ValueError(f"the held-out seed must differ from the discovery seed ({seed})")
    common: dict[str, Any] = {"prompt_type": prompt_type, "prepend_bos": prepend_bos}
    discovery = ioi_prompts(model, n_discovery, seed, "discovery", **common)
    heldout = ioi_prompts(model, n_heldout, heldout_seed, "heldout", **common)
    return discovery, heldout


def abc_tokens(
    model: Any, dataset: IOIDataset, seed: int = 0, names: Sequence[str] | None = None
) -> Int[Tensor, "n_prompts pos"]:
    """The ABC counterfactual of ``dataset``: IO, S1 and S2 replaced by three other names.

    Each prompt gets three distinct names drawn (with ``random.Random(seed)``) from the
    single-token names that are neither its IO nor its S; the tokens elsewhere, and so every
    position, stay the same.

    Args:
        model: a ``HookedTransformer`` (or its tokenizer).
        dataset: the prompts.
        seed: seed of the draw.
        names: the names to draw from (default: the names the dataset was made from, as
            :func:`ioi_split` records them, else the built-in list).

    Returns:
        ``[n_prompts, pos]`` token ids, like ``dataset.tokens``.

    Raises:
        ValueError: a name position does not hold the name's token (a tokenizer that merges a
            name with its neighbour), or fewer than five single-token names.
    """
    tokenizer = getattr(model, "tokenizer", None) or model
    pool_names = names if names is not None else dataset.meta.get("names", NAMES)
    pool_all = single_token_words(tokenizer, pool_names)
    if len(pool_all) < 5:
        raise ValueError(
            f"the ABC counterfactual needs >= 5 single-token names, got {len(pool_all)}"
        )
    ids = {n: tokenizer.encode(" " + n, add_special_tokens=False)[0] for n in pool_all}
    rng = random.Random(seed)
    out = dataset.tokens.clone()
    rows = torch.arange(len(dataset))
    if not (
        bool((out[rows, dataset.io_pos] == dataset.io_tokens).all())
        and bool((out[rows, dataset.s2_pos] == dataset.s_tokens).all())
    ):
        raise ValueError("IO/S2 positions do not hold the names' tokens; cannot corrupt them")
    for i in range(len(dataset)):
        pool = [n for n in pool_all if n not in (dataset.io_names[i], dataset.s_names[i])]
        a, b, c = rng.sample(pool, 3)
        out[i, dataset.io_pos[i]] = ids[a]
        out[i, dataset.s1_pos[i]] = ids[b]
        out[i, dataset.s2_pos[i]] = ids[c]
    return out
