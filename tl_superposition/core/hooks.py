"""TransformerLens hook names, built in one place.

TransformerLens names a block's hooks ``blocks.{layer}.{name}``, ``name`` relative to the block
(``attn.hook_pattern``, ``ln1.hook_normalized``). ``transformer_lens.utils.get_act_name`` builds
the same strings from short aliases (``"pattern"``) but mangles names that are already relative,
which is what this package stores in configs and manifests; hence this helper.
"""

from __future__ import annotations


def block_hook(layer: int, name: str) -> str:
    """Full name of hook ``name`` of block ``layer``: ``block_hook(3, "attn.hook_pattern")`` is
    ``"blocks.3.attn.hook_pattern"``.

    Raises:
        ValueError: ``name`` is already a full name (starts with ``blocks.``) or ``layer`` < 0.
    """
    if name.startswith("blocks."):
        raise ValueError(f"hook name {name!r} is already full: pass the part after 'blocks.L.'")
    if int(layer) < 0:
        raise ValueError(f"layer {layer} is negative: layers count from 0")
    return f"blocks.{int(layer)}.{name}"


def layer_hooks(layers: range | list[int], name: str) -> list[str]:
    """``block_hook(L, name)`` for every layer ``L`` of ``layers``, in order."""
    return [block_hook(L, name) for L in layers]
