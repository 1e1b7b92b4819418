"""Indirect-object-identification (IOI) prompts and the logit-difference metric.

Follows the task of Wang et al. 2022 ("Interpretability in the Wild", arXiv 2211.00593):
a sentence introduces two names, repeats one of them (the subject, S) and ends where the
other (the indirect object, IO) is the natural next token, e.g.

    "When Mary and John went to the store, John gave a drink to" -> " Mary"

Templates come in two name orders: ABBA (IO first: "... Mary and John ... John ...") and
BABA (S first: "... John and Mary ... John ..."). The template sentences, name, place and
object lists below are this project's own; names, places and objects are kept only when
they are a single token with a leading space for the tokenizer at hand.

Token positions, per prompt: ``io_pos`` and ``s1_pos`` (the two names of the first clause),
``s2_pos`` (the repeated subject), ``end_pos`` (the last token, where the IO is predicted).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

# Slots: [A] is the indirect object, [B] the subject (twice). Written in ABBA order; the BABA
# version of a template swaps the first [A] and [B].
BASE_TEMPLATES: tuple[str, ...] = (
    "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [A] and [B] arrived at the [PLACE], [B] handed a [OBJECT] to",
    "After [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to",
    "While [A] and [B] were working at the [PLACE], [B] passed a [OBJECT] to",
    "Then, [A] and [B] had a long argument. Afterwards [B] said to",
    "Then, [A] and [B] were at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Friends [A] and [B] found a [OBJECT] at the [PLACE]. [B] gave it to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "After the lunch, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to",
    "The [PLACE] was quiet when [A] and [B] arrived, so [B] gave a [OBJECT] to",
    "As [A] and [B] walked into the [PLACE], [B] threw a [OBJECT] to",
    "Once [A] and [B] reached the [PLACE], [B] offered a [OBJECT] to",
    "Yesterday [A] and [B] visited the [PLACE], and [B] sent a [OBJECT] to",
    "In the morning, [A] and [B] cleaned the [PLACE]. [B] brought a [OBJECT] to",
    "Later, [A] and [B] met at the [PLACE], where [B] showed a [OBJECT] to",
    "When [A] and [B] left the [PLACE], [B] returned the [OBJECT] to",
    "Because [A] and [B] stayed at the [PLACE], [B] lent a [OBJECT] to",
)


def _to_baba(template: str) -> str:
    a, b = template.index("[A]"), template.index("[B]")
    if a > b:
        raise ValueError(f"ABBA template must name [A] before [B]: {template!r}")
    return template[:a] + "[B]" + template[a + 3 : b] + "[A]" + template[b + 3 :]


ABBA_TEMPLATES: tuple[str, ...] = BASE_TEMPLATES
BABA_TEMPLATES: tuple[str, ...] = tuple(_to_baba(t) for t in BASE_TEMPLATES)

NAMES: tuple[str, ...] = (
    "Mary",
    "John",
    "Tom",
    "James",
    "Dan",
    "Sid",
    "Martin",
    "Amy",
    "Lisa",
    "Michael",
    "Sarah",
    "David",
    "Robert",
    "Paul",
    "Mark",
    "Peter",
    "Kevin",
    "Jason",
    "Brian",
    "Eric",
    "Steven",
    "Andrew",
    "Chris",
    "Jessica",
    "Emily",
    "Rachel",
    "Laura",
    "Anna",
    "Kate",
    "Alice",
    "Bob",
    "Sam",
    "Ben",
    "Jack",
    "Joe",
    "Mike",
    "Adam",
    "Alex",
    "Ryan",
    "Tim",
    "Matt",
    "Jane",
    "Helen",
    "Linda",
    "Karen",
    "Susan",
    "Nancy",
    "Betty",
    "Grace",
    "Emma",
    "Sophie",
    "Claire",
    "George",
    "Frank",
    "Henry",
    "Edward",
    "Charles",
    "Thomas",
    "William",
    "Richard",
    "Daniel",
    "Anthony",
    "Patrick",
    "Simon",
    "Luke",
    "Scott",
    "Jeff",
    "Greg",
    "Gary",
    "Larry",
    "Roger",
    "Victoria",
    "Rose",
    "Ruth",
    "Julia",
    "Diana",
    "Carl",
    "Joseph",
    "Lucy",
    "Elizabeth",
)
PLACES: tuple[str, ...] = (
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "station",
    "park",
    "beach",
    "library",
    "market",
    "kitchen",
    "church",
    "hotel",
    "bank",
    "museum",
    "airport",
    "farm",
    "cafe",
)
OBJECTS: tuple[str, ...] = (
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "drink",
    "snack",
    "book",
    "letter",
    "ball",
    "pen",
    "cake",
    "gift",
    "key",
    "card",
    "phone",
    "flower",
    "hat",
    "bag",
)

PromptType = Literal["ABBA", "BABA", "mixed"]
_SLOT = re.compile(r"\[(A|B|PLACE|OBJECT)\]")


@dataclass
class IOIDataset:
    """A batch of tokenised IOI prompts with the positions of IO, S1, S2 and END.

    Tokens are right-padded; attention is causal, so padding never changes what a real
    position sees. Index with an int array or slice to get a sub-dataset.

    Attributes:
        prompts: the prompt texts (without BOS).
        tokens: ``[n_prompts, max_len]`` token ids, right-padded with ``pad_token_id``.
        lengths: ``[n_prompts]`` number of real tokens (BOS included when ``prepend_bos``).
        io_tokens, s_tokens: ``[n_prompts]`` token ids of " IO" and " S".
        io_pos, s1_pos, s2_pos, end_pos: ``[n_prompts]`` token positions (BOS counted).
        io_names, s_names: the names as strings.
        templates: the template of each prompt; ``prompt_types``: "ABBA" or "BABA".
    """

    prompts: list[str]
    tokens: Int[Tensor, "n_prompts max_len"]
    lengths: Int[Tensor, " n_prompts"]
    io_tokens: Int[Tensor, " n_prompts"]
    s_tokens: Int[Tensor, " n_prompts"]
    io_pos: Int[Tensor, " n_prompts"]
    s1_pos: Int[Tensor, " n_prompts"]
    s2_pos: Int[Tensor, " n_prompts"]
    end_pos: Int[Tensor, " n_prompts"]
    io_names: list[str]
    s_names: list[str]
    templates: list[str]
    prompt_types: list[str]
    prepend_bos: bool = False
    pad_token_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx: slice | Sequence[int] | Tensor) -> IOIDataset:
        rows = list(range(len(self)))[idx] if isinstance(idx, slice) else [int(i) for i in idx]
        ix = torch.tensor(rows, dtype=torch.long)
        max_len = int(self.lengths[ix].max()) if rows else 0
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return IOIDataset(
            prompts=pick(self.prompts),
            tokens=self.tokens[ix, :max_len],
            lengths=self.lengths[ix],
            io_tokens=self.io_tokens[ix],
            s_tokens=self.s_tokens[ix],
            io_pos=self.io_pos[ix],
            s1_pos=self.s1_pos[ix],
            s2_pos=self.s2_pos[ix],
            end_pos=self.end_pos[ix],
            io_names=pick(self.io_names),
            s_names=pick(self.s_names),
            templates=pick(self.templates),
            prompt_types=pick(self.prompt_types),
            prepend_bos=self.prepend_bos,
            pad_token_id=self.pad_token_id,
            meta=dict(self.meta),
        )

    def positions(self) -> dict[str, Int[Tensor, " n_prompts"]]:
        """The named positions, ``{"IO": io_pos, "S1": s1_pos, "S2": s2_pos, "END": end_pos}``."""
        return {"IO": self.io_pos, "S1": self.s1_pos, "S2": self.s2_pos, "END": self.end_pos}

    def to_dataframe(self) -> pd.DataFrame:
        """One row per prompt.

        Columns: prompt_id, text, io, s, io_pos, s1_pos, s2_pos, end_pos, prompt_type.
        """
        return pd.DataFrame(
            {
                "prompt_id": range(len(self)),
                "text": self.prompts,
                "io": self.io_names,
                "s": self.s_names,
                "io_pos": self.io_pos.tolist(),
                "s1_pos": self.s1_pos.tolist(),
                "s2_pos": self.s2_pos.tolist(),
                "end_pos": self.end_pos.tolist(),
                "prompt_type": self.prompt_types,
            }
        )


# The roles of ACC++ (Franco & Crovella, arXiv 2602.13483; their ``datasets/ioi.py``), in
# their order of precedence: a position with two roles takes the later one.
ROLES: tuple[str, ...] = (
    "IO", "IO-1", "IO+1", "S1", "S1-1", "S1+1", "S2", "S2-1", "S2+1", "END", "END-1",
    "start", "punct", "verb",
)  # fmt: skip
PUNCTUATION: tuple[str, ...] = (",", ".")
# The verbs of this module's templates (ACC++'s GPT-2 templates use " gave", " give", " said").
VERBS: tuple[str, ...] = (
    "gave", "give", "handed", "passed", "said", "threw", "offered", "sent", "brought",
    "showed", "returned", "lent",
)  # fmt: skip


def _last_of(tokens: Tensor, lengths: Tensor, ids: Sequence[int]) -> Tensor:
    """Per prompt, the last real position holding one of ``ids`` (-1 where none does).

    ``ids`` are tried in order and a later one that occurs wins, as ACC++ does.
    """
    out = torch.full((len(tokens),), -1, dtype=torch.long)
    pos = torch.arange(tokens.shape[1])
    real = pos[None, :] < lengths[:, None]
    for token_id in ids:
        hit = (tokens == token_id) & real
        last = torch.where(hit, pos[None, :], torch.full_like(tokens, -1)).amax(1)
        out = torch.where(last >= 0, last, out)
    return out


def role_positions(dataset: IOIDataset, tokenizer_or_model: Any) -> dict[str, Tensor]:
    """ACC++'s named positions of each prompt: the names, their neighbours and more.

    Roles (:data:`ROLES`): IO, S1, S2 and END with the positions either side of each
    (``IO-1``, ``IO+1``, ...; END only before), ``start`` (position 0), ``punct`` (the last
    ``","`` or ``"."``; a full stop wins over a comma, as in ACC++) and ``verb`` (the last of
    :data:`VERBS`). Where a role has no position (a prompt without a full stop or verb) its
    entry is -1. Several roles can name one position; a reader labelling positions lets
    later roles of :data:`ROLES` win, as the trace's tables do.

    Args:
        dataset: the prompts.
        tokenizer_or_model: the tokenizer (or a ``HookedTransformer`` holding it) of
            ``dataset``, for the punctuation and verb tokens.

    Returns:
        ``{role: [n_prompts] positions}``, in the order of :data:`ROLES`.
    """
    tokenizer = getattr(tokenizer_or_model, "tokenizer", None) or tokenizer_or_model

    def ids(words: Sequence[str], space: str) -> list[int]:
        out = []
        for w in words:
            enc = tokenizer.encode(space + w, add_special_tokens=False)
            if len(enc) == 1:
                out.append(enc[0])
        return out

    base = {"IO": dataset.io_pos, "S1": dataset.s1_pos, "S2": dataset.s2_pos}
    roles: dict[str, Tensor] = {}
    for name, p in base.items():
        roles |= {name: p, f"{name}-1": p - 1, f"{name}+1": p + 1}
    roles |= {"END": dataset.end_pos, "END-1": dataset.end_pos - 1}
    roles["start"] = torch.zeros_like(dataset.end_pos)
    roles["punct"] = _last_of(dataset.tokens, dataset.lengths, ids(PUNCTUATION, ""))
    roles["verb"] = _last_of(dataset.tokens, dataset.lengths, ids(VERBS, " "))
    inside = lambda p: torch.where((p >= 0) & (p < dataset.lengths), p, -1)  # noqa: E731
    return {name: inside(roles[name].long()) for name in ROLES}


def single_token_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """The words that ``tokenizer`` encodes as exactly one token when preceded by a space."""
    keep = []
    for w in words:
        if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1:
            keep.append(w)
    return keep


def _check_template(template: str) -> None:
    slots = _SLOT.findall(template)
    if slots.count("A") != 1 or slots.count("B") != 2:
        raise ValueError(
            f"IOI template {template!r} needs one [A] (the IO) and two [B] (S1 and S2); "
            f"it has {slots.count('A')} [A] and {slots.count('B')} [B]"
        )
    first_b = template.index("[B]")
    second_b = template.index("[B]", first_b + 3)
    if template.index("[A]") > second_b:
        raise ValueError(f"IOI template {template!r}: [A] and the first [B] must come before S2")
    for m in _SLOT.finditer(template):
        if m.start() == 0 or template[m.start() - 1] != " ":
            raise ValueError(
                f"IOI template {template!r}: slot {m.group(0)} must follow a space, so that "
                "it is filled with one ' Name' token"
            )


def make_ioi_dataset(
    tokenizer_or_model: Any,
    n_prompts: int,
    prompt_type: PromptType = "mixed",
    seed: int = 0,
    prepend_bos: bool = False,
    *,
    names: Sequence[str] | None = None,
    places: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
) -> IOIDataset:
    """Generate ``n_prompts`` IOI prompts, deterministically for a given ``seed``.

    Args:
        tokenizer_or_model: a fast Hugging Face tokenizer or a ``HookedTransformer``.
        n_prompts: number of prompts (>= 1).
        prompt_type: "ABBA", "BABA" or "mixed" (each prompt's template drawn from both).
        seed: seed of the draw of templates, names, places and objects.
        prepend_bos: put the tokenizer's BOS token first (positions then count it).
        names, places, objects: word lists (default: the built-in ones); each is filtered to
            words that are one token with a leading space.
        templates: ABBA-ordered templates with one [A], two [B], and optional [PLACE] and
            [OBJECT] slots (default :data:`BASE_TEMPLATES`); BABA versions are derived.

    Returns:
        An :class:`IOIDataset`.

    Raises:
        ValueError: ``n_prompts < 1``; an unknown ``prompt_type``; fewer than two
            single-token names (or no single-token place/object while a template needs one);
            a template without the needed slots; a tokenizer without BOS when asked for one.
    """
    tokenizer = getattr(tokenizer_or_model, "tokenizer", None) or tokenizer_or_model
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise ValueError("make_ioi_dataset needs a tokenizer or a HookedTransformer with one")
    if int(n_prompts) < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    if prompt_type not in ("ABBA", "BABA", "mixed"):
        raise ValueError(f"prompt_type must be 'ABBA', 'BABA' or 'mixed', got {prompt_type!r}")

    base = tuple(templates) if templates is not None else BASE_TEMPLATES
    if not base:
        raise ValueError("templates is empty")
    for t in base:
        _check_template(t)
    families = {"ABBA": list(base), "BABA": [_to_baba(t) for t in base]}
    pool = (
        [("ABBA", t) for t in families["ABBA"]] + [("BABA", t) for t in families["BABA"]]
        if prompt_type == "mixed"
        else [(prompt_type, t) for t in families[prompt_type]]
    )

    name_list = single_token_words(tokenizer, names if names is not None else NAMES)
    if len(name_list) < 2:
        raise ValueError(
            f"only {len(name_list)} of the names are a single token with a leading space for "
            "this tokenizer; IOI needs at least 2. Pass names=[...] that tokenize to one token."
        )
    place_list = single_token_words(tokenizer, places if places is not None else PLACES)
    object_list = single_token_words(tokenizer, objects if objects is not None else OBJECTS)
    needs_place = any("[PLACE]" in t for _, t in pool)
    needs_object = any("[OBJECT]" in t for _, t in pool)
    if needs_place and not place_list:
        raise ValueError("no place is a single token for this tokenizer; pass places=[...]")
    if needs_object and not object_list:
        raise ValueError("no object is a single token for this tokenizer; pass objects=[...]")

    bos_id = tokenizer.bos_token_id if prepend_bos else None
    if prepend_bos and bos_id is None:
        raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    rng = random.Random(seed)
    rows: dict[str, list] = {
        k: []
        for k in (
            "prompt",
            "ids",
            "io_tok",
            "s_tok",
            "io_pos",
            "s1_pos",
            "s2_pos",
            "io",
            "s",
            "template",
            "ptype",
        )
    }
    for _ in range(int(n_prompts)):
        ptype, template = pool[rng.randrange(len(pool))]
        io, s = rng.sample(name_list, 2)
        fill = {
            "A": io,
            "B": s,
            "PLACE": rng.choice(place_list) if place_list else "",
            "OBJECT": rng.choice(object_list) if object_list else "",
        }
        text, name_spans = _fill(template, fill)
        ids, pos = _tokenize_with_positions(tokenizer, text, name_spans)
        if bos_id is not None:
            ids = [bos_id] + ids
            pos = [p + 1 for p in pos]
        io_tok = tokenizer.encode(" " + io, add_special_tokens=False)[0]
        s_tok = tokenizer.encode(" " + s, add_special_tokens=False)[0]
        # name_spans are in order of appearance: first clause (A, B in ABBA order) then S2.
        first, second, s2 = pos
        io_pos, s1_pos = (first, second) if ptype == "ABBA" else (second, first)
        for key, val in (
            ("prompt", text),
            ("ids", ids),
            ("io_tok", io_tok),
            ("s_tok", s_tok),
            ("io_pos", io_pos),
            ("s1_pos", s1_pos),
            ("s2_pos", s2),
            ("io", io),
            ("s", s),
            ("template", template),
            ("ptype", ptype),
        ):
            rows[key].append(val)

    lengths = torch.tensor([len(x) for x in rows["ids"]], dtype=torch.long)
    tokens = torch.full((len(lengths), int(lengths.max())), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows["ids"]):
        tokens[i, : len(ids)] = torch.tensor(ids)
    as_t = lambda k: torch.tensor(rows[k], dtype=torch.long)  # noqa: E731
    return IOIDataset(
        prompts=rows["prompt"],
        tokens=tokens,
        lengths=lengths,
        io_tokens=as_t("io_tok"),
        s_tokens=as_t("s_tok"),
        io_pos=as_t("io_pos"),
        s1_pos=as_t("s1_pos"),
        s2_pos=as_t("s2_pos"),
        end_pos=lengths - 1,
        io_names=rows["io"],
        s_names=rows["s"],
        templates=rows["template"],
        prompt_types=rows["ptype"],
        prepend_bos=prepend_bos,
        pad_token_id=int(pad_id),
        meta={
            "seed": seed,
            "prompt_type": prompt_type,
            "n_names": len(name_list),
            "n_places": len(place_list),
            "n_objects": len(object_list),
        },
    )


def _fill(template: str, fill: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """Fill the slots; return the text and the character spans of the three names.

    Each span includes the space before the name.
    """
    out, spans, last = [], [], 0
    for m in _SLOT.finditer(template):
        out.append(template[last : m.start()])
        start = sum(len(x) for x in out)
        word = fill[m.group(1)]
        out.append(word)
        if m.group(1) in ("A", "B"):
            spans.append((start - 1, start + len(word)))  # include the leading space
        last = m.end()
    out.append(template[last:])
    return "".join(out), spans


def _tokenize_with_positions(tokenizer: Any, text: str, spans: list[tuple[int, int]]):
    """Token ids of ``text`` and the index of the token covering each name span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    positions = []
    for lo, hi in spans:
        # Tokenizers differ on whether the leading space belongs to the name's token span.
        hits = [i for i, (a, b) in enumerate(offsets) if a >= lo and b <= hi and b > a]
        if len(hits) != 1:
            raise ValueError(
                f"name {text[lo:hi]!r} in {text!r} is not one token for this tokenizer "
                f"(tokens {[tokenizer.decode([ids[i]]) for i in hits]})"
            )
        positions.append(hits[0])
    return ids, positions


@torch.inference_mode()
def logit_diff(
    model: Any,
    dataset: IOIDataset,
    batch_size: int = 64,
) -> Float[Tensor, " n_prompts"]:
    """Per-prompt ``logit(IO) - logit(S)`` at the END position (Wang et al. 2022's metric).

    Args:
        model: a ``HookedTransformer`` (any module mapping ``[batch, pos]`` tokens to
            ``[batch, pos, d_vocab]`` logits).
        dataset: the prompts.
        batch_size: prompts per forward pass.

    Returns:
        ``[n_prompts]`` logit differences, in logits (nats of odds ratio).
    """
    out = []
    device = next(model.parameters()).device
    for lo in range(0, len(dataset), batch_size):
        part = dataset[lo : lo + batch_size]
        logits = model(part.tokens.to(device))
        out.append(logit_diff_from_logits(logits, part))
    return torch.cat(out)


def logit_diff_from_logits(
    logits: Float[Tensor, "batch pos d_vocab"], dataset: IOIDataset
) -> Float[Tensor, " batch"]:
    """``logit(IO) - logit(S)`` at END from the model's logits on ``dataset.tokens``.

    Args:
        logits: the output of the model on the (right-padded) tokens of ``dataset``.
        dataset: the prompts, one per row of ``logits``.

    Returns:
        ``[batch]`` float32 logit differences, on the CPU.
    """
    rows = torch.arange(len(dataset))
    end_logits = logits[rows, dataset.end_pos.to(logits.device)]
    io = end_logits.gather(-1, dataset.io_tokens.to(logits.device)[:, None])[:, 0]
    s = end_logits.gather(-1, dataset.s_tokens.to(logits.device)[:, None])[:, 0]
    return (io - s).float().cpu()


def logit_diff_from_resid(
    model: Any,
    resid: Float[Tensor, "rows pos d_model"],
    end_pos: Int[Tensor, " rows"],
    io_tokens: Int[Tensor, " rows"],
    s_tokens: Int[Tensor, " rows"],
) -> Float[Tensor, " rows"]:
    """``logit(IO) - logit(S)`` at ``end_pos`` from the residual stream after the last block.

    ``ln_final`` and two columns of the unembedding, at one position per row: equal to the
    full model's logits up to float rounding.
    """
    dev = resid.device
    rows = torch.arange(len(end_pos), device=dev)
    x = resid[rows, end_pos.to(dev)][:, None, :]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    io, s = io_tokens.to(dev), s_tokens.to(dev)
    direction = (model.W_U[:, io] - model.W_U[:, s]).T
    return ((x[:, 0] * direction).sum(1) + model.b_U[io] - model.b_U[s]).float().cpu()
