"""Floating-point dtypes by name: one parser for every ``dtype=`` argument of the package."""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Canonical names of the floating-point dtypes the package accepts.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


def parse_dtype(
    dtype: str | torch.dtype, allowed: Iterable[str] = FLOAT_DTYPES, what: str = "dtype"
) -> tuple[str, torch.dtype]:
    """The canonical name and torch dtype, e.g. ``("float16", torch.float16)``.

    Accepts a torch dtype, a name (``"float16"``, ``"torch.float16"``) or an alias
    (``"fp16"``, ``"half"``).

    Args:
        dtype: the dtype or its name.
        allowed: canonical names accepted here (default: every float dtype).
        what: what the dtype is for, used in the error message (e.g. ``"storage dtype"``).

    Raises:
        ValueError: an unknown or disallowed dtype; the message lists the allowed names.
    """
    allowed = list(allowed)
    if isinstance(dtype, torch.dtype):
        name = next((n for n, dt in FLOAT_DTYPES.items() if dt == dtype), str(dtype))
    else:
        name = str(dtype).lower().removeprefix("torch.")
        name = _ALIASES.get(name, name)
    if name not in allowed:
        raise ValueError(f"{what} {dtype!r} not supported: use one of {', '.join(allowed)}")
    return name, FLOAT_DTYPES[name]
