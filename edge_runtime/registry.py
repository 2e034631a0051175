"""One small string-keyed registry for every extension point (models, backends, exporters, recipes, layouts).

Things register where they are defined (``@MODELS.decorator("name")``); a lookup of an unknown name raises
:class:`~edge_runtime.errors.UnknownNameError` listing what is registered and the closest matches.
"""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    """The error for ``name`` missing among ``known`` (also used by plain lookup tables such as the format table)."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=3)
    return UnknownNameError(f"unknown {kind} {name!r}; known: {known}" + (f"; did you mean {close}?" if close else ""))


class Registry(Generic[T]):
    """Name -> T, in registration order.

    Args:
        kind (`str`): what the entries are, for error messages (``"model"``, ``"quantization recipe"``).

    Example:
        >>> BACKENDS: Registry[type] = Registry("backend")
        >>> @BACKENDS.decorator("onnxruntime")
        ... class OnnxRuntimeSession: ...
        >>> BACKENDS.get("onnxruntime")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Store ``entry`` under ``name``; replacing a different entry warns (as timm does), the newer one wins."""
        if name in self._entries and self._entries[name] is not entry:
            warnings.warn(f"{self.kind} {name!r} re-registered; the newer definition wins", stacklevel=3)
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator(name)``: register the decorated function or class under ``name``."""
        return lambda entry: self.register(name, entry)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
