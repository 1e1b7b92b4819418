"""``QKTranscoder``: a query dictionary and a key dictionary for one attention layer.

Wynroe & Sharkey (2024), "Decomposing the QK circuit with bilinear sparse dictionary
learning": two transcoders read the layer's normalised residual stream
``x = blocks.L.ln1.hook_normalized`` and reconstruct its queries ``attn.hook_q`` and keys
``attn.hook_k`` (all heads, before any rotary embedding). The pattern computed from the
reconstructions by the model's own attention code should match the true pattern; then every
attention score splits into (query feature, key feature) pair terms (:mod:`.attribution`).

Folder format written by :meth:`QKTranscoder.save`::

    folder/
      qk_transcoder.json        {"format": ..., "config": QKTranscoderConfig.to_dict()}
      q/cfg.json, q/sae_weights.safetensors   the query dictionary (SAELens format)
      k/cfg.json, k/sae_weights.safetensors   the key dictionary (SAELens format)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float
from sae_lens import Transcoder
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule, HookPoint

from tl_superposition.core.atomic import apply_umask, write_json_atomic
from tl_superposition.core.reading import read_json
from tl_superposition.qk.config import AttentionShape, QKTranscoderConfig
from tl_superposition.qk.dictionaries import dictionary_equal, load_dictionary, make_dictionary
from tl_superposition.qk.splice import qk_hooks

FORMAT = "tl_superposition.qk/1"
CONFIG_FILE = "qk_transcoder.json"
Which = Literal["both", "q", "k"]


class QKOutput(NamedTuple):
    """What :meth:`QKTranscoder.forward` returns.

    Attributes:
        q: reconstructed queries ``[batch, pos, n_heads, d_head]`` (``hook_q``'s shape).
        k: reconstructed keys ``[batch, pos, n_key_value_heads, d_head]``.
        q_features: query feature activations ``[batch, pos, d_hidden_q]``.
        k_features: key feature activations ``[batch, pos, d_hidden_k]``.
    """

    q: Tensor
    k: Tensor
    q_features: Tensor
    k_features: Tensor


class QKTranscoder(HookedRootModule):
    """The query and key transcoders of one layer, as one TransformerLens module.

    Args:
        cfg: architecture (:class:`QKTranscoderConfig`).
        q_dict, k_dict: existing SAELens dictionaries (default: new ones, initialised as
            SAELens initialises transcoders, from ``generator``).
        generator: random source of new dictionaries' weights.

    Hook points (besides each dictionary's own SAELens hooks under ``q_dict.`` / ``k_dict.``):

    - ``hook_q_features``: query feature activations ``[batch, pos, d_hidden_q]``
    - ``hook_k_features``: key feature activations ``[batch, pos, d_hidden_k]``
    - ``hook_q_recon``: reconstructed queries ``[batch, pos, n_heads, d_head]``
    - ``hook_k_recon``: reconstructed keys ``[batch, pos, n_key_value_heads, d_head]``

    Raises:
        ValueError: a given dictionary's sizes disagree with ``cfg``.
    """

    def __init__(
        self,
        cfg: QKTranscoderConfig,
        q_dict: Transcoder | None = None,
        k_dict: Transcoder | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        shape = cfg.shape
        top_k = cfg.top_k if cfg.sparsity == "topk" else None
        x_hook = shape.hook("ln1.hook_normalized")
        if q_dict is None:
            q_dict = make_dictionary(
                shape.d_model,
                shape.d_q,
                cfg.d_hidden_q,
                top_k=top_k,
                hook_name=x_hook,
                hook_name_out=shape.hook("attn.hook_q"),
                model_name=cfg.model_name,
                generator=generator,
            )
        if k_dict is None:
            k_dict = make_dictionary(
                shape.d_model,
                shape.d_k,
                cfg.d_hidden_k,
                top_k=top_k,
                hook_name=x_hook,
                hook_name_out=shape.hook("attn.hook_k"),
                model_name=cfg.model_name,
                generator=generator,
            )
        _check_dictionary(q_dict, shape.d_model, shape.d_q, cfg.d_hidden_q, "query")
        _check_dictionary(k_dict, shape.d_model, shape.d_k, cfg.d_hidden_k, "key")
        self.q_dict = q_dict
        self.k_dict = k_dict
        self.hook_q_features = HookPoint()
        self.hook_k_features = HookPoint()
        self.hook_q_recon = HookPoint()
        self.hook_k_recon = HookPoint()
        self.setup()

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_model(
        cls,
        model: HookedTransformer,
        layer: int,
        *,
        d_hidden: int | tuple[int, int] = 1200,
        sparsity: str = "sqrt",
        top_k: int = 32,
        generator: torch.Generator | None = None,
    ) -> QKTranscoder:
        """A new, untrained QK transcoder shaped for ``model``'s layer ``layer``.

        Args:
            d_hidden: features per dictionary, or ``(d_hidden_q, d_hidden_k)``.
            sparsity, top_k: see :class:`QKTranscoderConfig`.

        Raises:
            ValueError: the layer does not exist or its attention is not supported.
        """
        dq, dk = (d_hidden, d_hidden) if isinstance(d_hidden, int) else d_hidden
        cfg = QKTranscoderConfig(
            shape=AttentionShape.from_model(model, layer),
            d_hidden_q=dq,
            d_hidden_k=dk,
            sparsity=sparsity,  # type: ignore[arg-type]
            top_k=top_k,
            model_name=str(model.cfg.model_name),
        )
        return cls(cfg, generator=generator).to(model.cfg.device)

    @property
    def shape(self) -> AttentionShape:
        """The attention geometry this transcoder belongs to."""
        return self.cfg.shape

    def check_model(self, model: HookedTransformer) -> None:
        """Raise :class:`ValueError` unless ``model``'s layer has this transcoder's shape."""
        self.shape.check_model(model)

    # ------------------------------------------------------------------ forward

    def encode_q(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_hidden_q"]:
        """Query feature activations of normalised residual vectors ``x``."""
        return self.hook_q_features(self.q_dict.encode(x))

    def encode_k(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_hidden_k"]:
        """Key feature activations of normalised residual vectors ``x``."""
        return self.hook_k_features(self.k_dict.encode(x))

    def decode_q(self, f: Float[Tensor, "... d_hidden_q"]) -> Float[Tensor, "... n_heads d_head"]:
        """Reconstructed queries ``f W_dec + b_dec``, split into heads."""
        s = self.shape
        q = self.q_dict.decode(f)
        return self.hook_q_recon(q.reshape(*q.shape[:-1], s.n_heads, s.d_head))

    def decode_k(
        self, f: Float[Tensor, "... d_hidden_k"]
    ) -> Float[Tensor, "... n_key_value_heads d_head"]:
        """Reconstructed keys ``f W_dec + b_dec``, split into key/value heads."""
        s = self.shape
        k = self.k_dict.decode(f)
        return self.hook_k_recon(k.reshape(*k.shape[:-1], s.n_key_value_heads, s.d_head))

    def forward(self, x: Float[Tensor, "... d_model"]) -> QKOutput:  # type: ignore[override]
        """Features and reconstructions of queries and keys from ``ln1.hook_normalized``."""
        fq = self.encode_q(x)
        fk = self.encode_k(x)
        return QKOutput(self.decode_q(fq), self.decode_k(fk), fq, fk)

    def q_decoder(self) -> Float[Tensor, "d_hidden_q n_heads d_head"]:
        """The query decoder rows split into heads (a view of ``q_dict.W_dec``)."""
        s = self.shape
        return self.q_dict.W_dec.view(-1, s.n_heads, s.d_head)

    def k_decoder(self) -> Float[Tensor, "d_hidden_k n_key_value_heads d_head"]:
        """The key decoder rows split into key/value heads (a view of ``k_dict.W_dec``)."""
        s = self.shape
        return self.k_dict.W_dec.view(-1, s.n_key_value_heads, s.d_head)

    # ------------------------------------------------------------------ splicing

    @contextmanager
    def splice(
        self,
        model: HookedTransformer,
        which: Which = "both",
        heads: Sequence[int] | None = None,
    ) -> Iterator[HookedTransformer]:
        """Run ``model`` with reconstructed queries and/or keys at this layer.

        Without ``heads``, ``blocks.L.attn.hook_q`` (``which`` "q" or "both") and
        ``hook_k`` ("k" or "both") are replaced by the reconstructions computed from the same
        forward pass's ``ln1.hook_normalized``; everything downstream (rotary embedding,
        scores, pattern, z, later layers, logits) then uses them. With ``heads``, only those
        query heads' scores (``hook_attn_scores``) are replaced by scores from the
        reconstructions, so that other heads sharing a key/value head keep their true keys.

        Usage::

            with qkt.splice(model, "both"):
                loss = model(tokens, return_type="loss")

        Raises:
            ValueError: ``model`` has another attention shape, ``which`` is unknown, or a
                head index is out of range.
        """
        self.check_model(model)
        if which not in ("both", "q", "k"):
            raise ValueError(f"which must be 'both', 'q' or 'k', got {which!r}")
        hooks = qk_hooks(
            model,
            self.shape,
            self.reconstruct_q if which in ("both", "q") else None,
            self.reconstruct_k if which in ("both", "k") else None,
            heads,
        )
        with model.hooks(fwd_hooks=hooks):
            yield model

    def reconstruct_q(self, x: Tensor, q: Tensor | None = None) -> Tensor:
        """Reconstructed queries of ``x`` (``q``, the true value, is not used)."""
        del q
        return self.decode_q(self.encode_q(x))

    def reconstruct_k(self, x: Tensor, k: Tensor | None = None) -> Tensor:
        """Reconstructed keys of ``x`` (``k``, the true value, is not used)."""
        del k
        return self.decode_k(self.encode_k(x))

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pair into folder ``path`` (see the module docstring).

        Everything is first written to a temporary folder beside ``path``. A new ``path``
        is then created by one rename. An existing folder (e.g. a training run's, holding
        its checkpoint) keeps its other files; its ``q/``, ``k/`` and
        ``qk_transcoder.json`` are replaced one by one, each by a rename, the config last.

        Returns:
            ``path`` as a :class:`Path`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.q_dict.save_model(tmp / "q")
            self.k_dict.save_model(tmp / "k")
            write_json_atomic(tmp / CONFIG_FILE, {"format": FORMAT, "config": self.cfg.to_dict()})
            apply_umask(tmp)  # SAELens writes its weights readable by the owner only
            if not path.exists():
                os.replace(tmp, path)
                return path
            for name in ("q", "k"):
                _replace_dir(tmp / name, path / name)
            os.replace(tmp / CONFIG_FILE, path / CONFIG_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> QKTranscoder:
        """Load a folder written by :meth:`save` (each dictionary through SAELens's loader).

        Raises:
            FileNotFoundError: ``path`` holds no ``qk_transcoder.json``.
            ValueError: the folder's format or dictionaries do not match its config.
        """
        path = Path(path)
        cfg_path = path / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"no {CONFIG_FILE} in {path}: not a QK transcoder folder (write one with "
                "QKTranscoder.save or tl-superposition train-qk)"
            )
        meta = read_json(cfg_path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        cfg = QKTranscoderConfig.from_dict(meta["config"])
        q_dict = load_dictionary(path / "q", device=device)
        k_dict = load_dictionary(path / "k", device=device)
        return cls(cfg, q_dict, k_dict)

    def equal(self, other: QKTranscoder) -> bool:
        """Same config and exactly equal weights in both dictionaries."""
        return (
            self.cfg.to_dict() == other.cfg.to_dict()
            and dictionary_equal(self.q_dict, other.q_dict)
            and dictionary_equal(self.k_dict, other.k_dict)
        )


def _check_dictionary(d: Transcoder, d_in: int, d_out: int, d_sae: int, what: str) -> None:
    got = (d.cfg.d_in, d.cfg.d_out, d.cfg.d_sae)
    if got != (d_in, d_out, d_sae):
        raise ValueError(
            f"the {what} dictionary has (d_in, d_out, d_sae) = {got}, the config wants "
            f"{(d_in, d_out, d_sae)}"
        )


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename folder ``src`` onto ``dst``; an existing ``dst`` is removed only afterwards."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
