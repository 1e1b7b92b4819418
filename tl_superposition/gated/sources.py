"""Where a gated block's training pairs (layer input, layer attention output) come from.

A source is deterministic in ``(epoch, index)``: :meth:`batch` returns the same tensors for the
same arguments, so a resumed run sees exactly the batches an uninterrupted one would.

- :class:`TensorBatches` -- pairs already in memory (the toys: all activations fit).
- :class:`LazyTensorBatches` -- the same, computed on the first batch asked for (resuming a
  finished run then computes nothing).
- :class:`StoreBatches` -- whole contexts from a :func:`tl_superposition.collect` folder read
  with :class:`~tl_superposition.activations.ActivationStore` (hooks
  ``blocks.L.ln1.hook_normalized`` and ``blocks.L.hook_attn_out``).
- :class:`ModelBatches` -- streamed: the model runs up to the layer on token contexts each time.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_superposition.activations.batches import (
    ModelActivations,
    StoreActivations,
    TensorActivations,
    n_batches,
    run_hooks,
)
from tl_superposition.core.hooks import block_hook


class BatchSource(Protocol):
    """What :func:`~tl_superposition.gated.train.train_gated_block` reads."""

    n_batches: int

    def batch(
        self, epoch: int, index: int
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"]]:
        """``(input, target)`` of batch ``index`` of ``epoch``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description (stored in checkpoints; a resume must match it)."""
        ...


class TensorBatches:
    """Batches of in-memory pairs ``x[i], y[i]``.

    Args:
        x, y: ``[n, ...]`` inputs and targets (e.g. ``[n, pos, d_model]`` each, or tokens
            ``[n, pos]`` and summed outputs for blocks trained together).
        batch_size: rows per batch (the last batch of an epoch may be smaller).
        shuffle: new random order every epoch (seeded by ``seed`` and the epoch); False
            keeps the rows' order, as the authors' toy training does.

    Raises:
        ValueError: ``x`` and ``y`` differ in shape, or ``batch_size < 1``.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ in length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.n_batches = n_batches(x.shape[0], batch_size, drop_last=False)
        self._rows = TensorActivations({"x": x, "y": y}, seed, shuffle)

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Rows ``index * batch_size ...`` of this epoch's order."""
        got = self._rows.batch(self.batch_size, epoch, index)
        return got["x"], got["y"]

    def describe(self) -> dict[str, Any]:
        """Kind, shape and batching."""
        return {
            "kind": "tensors",
            "shape": [list(self.x.shape), list(self.y.shape)],
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }


class LazyTensorBatches:
    """:class:`TensorBatches` whose pairs are computed when the first batch is asked for.

    A run resumed from a finished checkpoint asks for no batch, so it skips the (long) model
    pass that makes the pairs.

    Args:
        make: returns ``(x, y)``, each of shape ``shape``.
        shape: the shape ``make`` returns (``[n, pos, d_model]``), for :meth:`describe`.
        batch_size, shuffle, seed: as for :class:`TensorBatches`.

    Raises:
        ValueError: ``batch_size < 1``; on first use, ``make`` returned other shapes.
    """

    def __init__(
        self,
        make: Any,
        shape: tuple[int, ...] | list[int],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._make, self._shape = make, [int(n) for n in shape]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.n_batches = n_batches(self._shape[0], batch_size, drop_last=False)
        self._pairs: TensorBatches | None = None

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """As :meth:`TensorBatches.batch` (the pairs are made on the first call)."""
        if self._pairs is None:
            x, y = self._make()
            if [list(x.shape), list(y.shape)] != [self._shape, self._shape]:
                raise ValueError(
                    f"pairs of shapes {tuple(x.shape)}, {tuple(y.shape)}, expected {self._shape}"
                )
            self._pairs = TensorBatches(x, y, self.batch_size, self.shuffle, self.seed)
        return self._pairs.batch(epoch, index)

    def describe(self) -> dict[str, Any]:
        """As :meth:`TensorBatches.describe` (equal to it for the same pairs)."""
        return {
            "kind": "tensors",
            "shape": [self._shape, self._shape],
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }


class StoreBatches:
    """Whole-context batches from an activation collection.

    Args:
        store: an :class:`~tl_superposition.activations.ActivationStore` (or its folder)
            holding ``blocks.{layer}.{input_hook}`` and ``blocks.{layer}.hook_attn_out``.
        layer: the layer.
        batch_size: contexts per batch.
        seed: seed of the per-epoch shuffle.
        input_hook: the block's input hook under ``blocks.{layer}.``.
        contexts: use only these context indices (e.g. a training split); default all.

    Raises:
        KeyError: the store lacks one of the two hooks (the message names the collect call
            that adds them).
    """

    def __init__(
        self,
        store: Any,
        layer: int,
        batch_size: int,
        seed: int = 0,
        input_hook: str = "ln1.hook_normalized",
        contexts: Tensor | None = None,
    ) -> None:
        if not hasattr(store, "get_contexts"):
            from tl_superposition.activations import ActivationStore

            store = ActivationStore(store)
        self.store = store
        self.x_name = block_hook(layer, input_hook)
        self.y_name = block_hook(layer, "hook_attn_out")
        missing = [h for h in (self.x_name, self.y_name) if h not in store.hooks]
        if missing:
            raise KeyError(
                f"{store.path} lacks {missing}; collect them with "
                f"hooks=['{input_hook}', 'hook_attn_out'], layers={layer}"
            )
        self._rows = StoreActivations(
            store, [self.x_name, self.y_name], seed, contexts=contexts, tokens=False
        )
        self.contexts = self._rows.contexts
        if batch_size < 1 or self.contexts.numel() == 0:
            raise ValueError("batch_size must be >= 1 and the context list non-empty")
        self.batch_size, self.seed = batch_size, seed
        self.n_batches = n_batches(self._rows.n_rows, batch_size, drop_last=False)

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """This epoch's contexts ``index * batch_size ...`` (float32)."""
        got = self._rows.batch(self.batch_size, epoch, index)
        return got[self.x_name].float(), got[self.y_name].float()

    def describe(self) -> dict[str, Any]:
        """Kind, folder, hooks and batching."""
        return {
            "kind": "store",
            "path": str(self.store.path),
            "hooks": [self.x_name, self.y_name],
            "n_contexts": int(self.contexts.numel()),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


class ModelBatches:
    """Pairs computed on the fly: the model runs to ``layer`` on token contexts.

    Args:
        model: a ``HookedTransformer``.
        layer: the layer.
        tokens: int ``[n_contexts, context_size]`` (e.g. packed text with BOS).
        batch_size: contexts per batch.
        seed: seed of the per-epoch shuffle.
        input_hook: the block's input hook under ``blocks.{layer}.``.
    """

    def __init__(
        self,
        model: Any,
        layer: int,
        tokens: Int[Tensor, "n_contexts ctx"],
        batch_size: int,
        seed: int = 0,
        input_hook: str = "ln1.hook_normalized",
    ) -> None:
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ValueError(
                f"tokens must be a non-empty [n_contexts, ctx], got {tuple(tokens.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.layer, self.tokens = model, layer, tokens.long()
        self.batch_size, self.seed = batch_size, seed
        self.x_name = block_hook(layer, input_hook)
        self.y_name = block_hook(layer, "hook_attn_out")
        self.n_batches = n_batches(tokens.shape[0], batch_size, drop_last=False)
        self._rows = ModelActivations(model, self.tokens, [self.x_name, self.y_name], seed)

    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        """Run the model on this epoch's contexts ``index * batch_size ...``."""
        got = self._rows.batch(self.batch_size, epoch, index)
        return got[self.x_name].float(), got[self.y_name].float()

    def describe(self) -> dict[str, Any]:
        """Kind, model, hooks and batching."""
        return {
            "kind": "model",
            "model": getattr(self.model.cfg, "model_name", None),
            "hooks": [self.x_name, self.y_name],
            "n_contexts": int(self.tokens.shape[0]),
            "context_size": int(self.tokens.shape[1]),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


@torch.no_grad()
def layer_activations(
    model: Any,
    tokens: Int[Tensor, "n pos"],
    layer: int,
    input_hook: str,
    batch_size: int = 5000,
    progress: bool = False,
) -> tuple[Float[Tensor, "n pos d_model"], Float[Tensor, "n pos d_model"]]:
    """A layer's input and attention output on every row of ``tokens``, kept in memory.

    For toy models, and for real-model runs small enough to hold ``2 x 4 x d_model`` bytes
    per token (float32). The model runs only up to ``layer``.
    """
    names = [block_hook(layer, input_hook), block_hook(layer, "hook_attn_out")]
    device = next(model.parameters()).device
    xs, ys = [], []
    starts = range(0, tokens.shape[0], batch_size)
    for lo in tqdm(starts, desc="layer activations", disable=not progress, leave=False):
        got = run_hooks(model, tokens[lo : lo + batch_size].to(device), names, to_cpu=True)
        xs.append(got[names[0]])
        ys.append(got[names[1]])
    return torch.cat(xs), torch.cat(ys)


def text_contexts(
    model: Any, source: str, split: str | None, context_size: int, max_tokens: int
) -> Int[Tensor, "n_contexts context_size"]:
    """The first ``max_tokens // context_size`` contexts of a text source, each opening with BOS.

    Packed by :func:`tl_superposition.activations.pack_text` with BOS (EOS where the tokenizer
    has no BOS) at the start of every context and no separator between documents.

    Args:
        source: a text file, a folder of ``{split}.txt`` files, ``"pydoc"``, or a dataset name.

    Returns:
        int64 ``[n_contexts, context_size]``.

    Raises:
        ValueError: the source yields no complete context.
        FileNotFoundError: a path that does not exist.
    """
    from tl_superposition.activations import pack_text

    return pack_text(
        model,
        source,
        context_size=context_size,
        split=split,
        max_contexts=max(1, max_tokens // context_size),
        prepend_bos=True,
        separator="none",
    )
