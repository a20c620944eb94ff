"""One small registry per kind of pluggable part (models, balancers, ...).

A decorator on the class registers its name; configs and the CLI select by
name, and nothing else in the code branches on method names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from mtrec.errors import MtrecError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a class, with a one-line description for listings."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Class decorator: register ``cls`` under ``name``."""

        def decorate(cls: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = cls
            doc = (getattr(cls, "__doc__", None) or "").strip().splitlines()
            self._descriptions[name] = description or (doc[0] if doc else "")
            setattr(cls, "registered_name", name)  # noqa: B010  (T is any class: no attribute to declare)
            return cls

        return decorate

    def get(self, name: str) -> T:
        """Look up ``name``; an unknown name is a user error listing the choices."""
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items))
            raise MtrecError(f"unknown {self.kind} '{name}'; choose one of: {choices}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, sorted by name."""
        return {name: self._descriptions[name] for name in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._items
