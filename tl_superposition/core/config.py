"""The config pattern every method follows.

A config is a dataclass deriving from :class:`Config`: each field documented in the class
docstring, checked in ``__post_init__`` (a :class:`ValueError` naming the field and the allowed
range), saved with :meth:`Config.to_dict` and read back with :meth:`Config.from_dict`, which
refuses fields it does not know (a file from another tool or version) instead of ignoring them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class Config:
    """Base of the package's config dataclasses: JSON round trip and checked copies.

    A plain class (no fields of its own), so frozen and mutable dataclasses both derive from it.
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]  # set by @dataclass on the subclass
    #: fields renamed since files were written with the old name: ``{old: new}``
    renamed: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (nested dataclasses as dicts, tuples as lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; fields missing from ``d`` take their defaults, fields
        under a former name (:attr:`renamed`) are read under the new one.

        Raises:
            ValueError: ``d`` has fields this config does not know, or a value out of range.
        """
        d = {cls.renamed.get(k, k): v for k, v in d.items()}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (and checked again)."""
        return dataclasses.replace(self, **changes)
