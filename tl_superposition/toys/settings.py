"""The named toy settings: task, model shape, and the gated block's settings for each.

=============  ===========================================  ======  =========  ======  =====
name           task                                         layers  heads      alpha   lr
=============  ===========================================  ======  =========  ======  =====
``2H/3ST``     3 OV-incoherent skip trigrams                1       2          0.5     5e-4
``3H/4ST``     4 skip trigrams                              1       3          0.1     5e-4
``4H/5ST``     5 skip trigrams                              1       4          0.3     1e-3
``OV-coh``     OV-coherent pairs (Greenspan & Wynroe)       1       2          --      --
``copy3``      3 copy tasks needing 2 heads each            1       3          0.3     1e-3
``2L/3ST``     3 skip trigrams, one head per layer          2       1          0.3     1e-3
=============  ===========================================  ======  =========  ======  =====

The first three are the published settings, with the authors' alpha and learning rate (1000
epochs of 100 batches of 1000 sequences). ``copy3`` is the "overlapping necessary
superposition" limit: its reference model is the hand-built pairs model
(:func:`~tl_superposition.toys.models.overlap_copy_model`) unless a trained one is asked for.
``2L/3ST`` has more trigrams (3) than one layer of one ``d_head = 1`` head can carry
(``n_heads ** 2 + n_heads = 2``), so the two layers must share them: the cross-layer setting.
The alpha and learning rate of the last two are this project's choice (the 4H/5ST values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tl_superposition.toys.datasets import (
    ToyDataset,
    ov_coherent_dataset,
    overlap_copy_dataset,
    skip_trigram_dataset,
)
from tl_superposition.toys.train import ToyTrainConfig

TASKS = ("skip_trigram", "ov_coherent", "overlap_copy")


@dataclass(frozen=True)
class ToySetting:
    """One toy setting.

    Attributes:
        name: short name (``"2H/3ST"``).
        task: ``"skip_trigram"``, ``"ov_coherent"`` or ``"overlap_copy"``.
        n_heads: heads per layer of the toy model.
        n_layers: layers of the toy model.
        n_trigrams: skip trigrams (skip-trigram task only).
        alpha, lr, epochs: the gated block's penalty weight, Adam learning rate and epochs.
        expansion_factor: gated-block heads per toy-model head.
        constructed: the reference model is hand-built rather than trained.
        description: one line for tables.
        toy_loss: the toy model's loss positions (``"all"``: next-token loss everywhere, as
            the authors' script trains the skip-trigram models; ``"asked"``: only where an
            answer is asked, as for the OV-coherent read-off).
        toy_lr: the toy model's learning rate.
    """

    name: str
    task: str
    n_heads: int
    n_layers: int = 1
    n_trigrams: int = 0
    alpha: float = 0.5
    lr: float = 5e-4
    epochs: int = 1000
    expansion_factor: int = 2
    constructed: bool = False
    description: str = ""
    toy_loss: str = "all"
    toy_lr: float = 5e-3

    @property
    def slug(self) -> str:
        """File-name-safe name (``"2H-3ST"``)."""
        return self.name.replace("/", "-")

    def dataset(self, n_samples: int, seed: int) -> ToyDataset:
        """``n_samples`` sequences of this setting's task."""
        if self.task == "skip_trigram":
            return skip_trigram_dataset(self.n_trigrams, n_samples, seed=seed)
        if self.task == "ov_coherent":
            return ov_coherent_dataset(n_samples, seed=seed)
        return overlap_copy_dataset(n_samples, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict."""
        return dict(self.__dict__)

    def toy_train_config(self) -> ToyTrainConfig:
        """Training settings of the reference toy model (at least 20 epochs, then until every
        task is above 99%)."""
        return ToyTrainConfig(lr=self.toy_lr, loss_positions=self.toy_loss, min_epochs=20)


SETTINGS: dict[str, ToySetting] = {
    s.name: s
    for s in [
        ToySetting(
            "2H/3ST",
            "skip_trigram",
            2,
            n_trigrams=3,
            alpha=0.5,
            lr=5e-4,
            description="2 heads, 3 skip trigrams",
        ),
        ToySetting(
            "3H/4ST",
            "skip_trigram",
            3,
            n_trigrams=4,
            alpha=0.1,
            lr=5e-4,
            description="3 heads, 4 skip trigrams",
        ),
        ToySetting(
            "4H/5ST",
            "skip_trigram",
            4,
            n_trigrams=5,
            alpha=0.3,
            lr=1e-3,
            description="4 heads, 5 skip trigrams",
        ),
        ToySetting(
            "OV-coh",
            "ov_coherent",
            2,
            description="OV-coherent pairs, 2 heads",
            toy_loss="asked",
            toy_lr=1e-2,
        ),
        ToySetting(
            "copy3",
            "overlap_copy",
            3,
            alpha=0.3,
            lr=1e-3,
            constructed=True,
            description="3 copy tasks over 3 heads as overlapping pairs",
        ),
        ToySetting(
            "2L/3ST",
            "skip_trigram",
            1,
            n_layers=2,
            n_trigrams=3,
            alpha=0.3,
            lr=1e-3,
            expansion_factor=3,
            description="2 layers x 1 head, 3 skip trigrams",
        ),
    ]
}

#: The three published settings.
PUBLISHED = ("2H/3ST", "3H/4ST", "4H/5ST")


def get_setting(name: str) -> ToySetting:
    """The setting called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return SETTINGS[name]
    except KeyError:
        raise ValueError(f"unknown toy setting {name!r}; known: {list(SETTINGS)}") from None
