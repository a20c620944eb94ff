"""``TypedModuleList[M]`` and ``TypedModuleDict[M]``: an ``nn.ModuleList`` / ``nn.ModuleDict`` whose
members are all ``M``.

Torch types a ``ModuleList``'s items as plain ``nn.Module``, so code that iterates a stack of levels
and reads their attributes (``layer.gate_group``, ``layer.experts``) is untyped to a checker. This
subclass changes nothing at run time (same state-dict keys, same tracing); it only says what
indexing and iteration return.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar, cast, overload

from torch import nn

M = TypeVar("M", bound=nn.Module)


class TypedModuleList(nn.ModuleList, Generic[M]):
    """A module list of ``M`` members (see the module docstring)."""

    def __init__(self, modules: Iterable[M] | None = None) -> None:
        super().__init__(modules)

    def __iter__(self) -> Iterator[M]:
        return cast(Iterator[M], super().__iter__())

    @overload
    def __getitem__(self, idx: slice) -> TypedModuleList[M]: ...

    @overload
    def __getitem__(self, idx: int) -> M: ...

    def __getitem__(self, idx: int | slice) -> M | TypedModuleList[M]:
        return cast("M | TypedModuleList[M]", super().__getitem__(idx))


class TypedModuleDict(nn.ModuleDict, Generic[M]):
    """A module dict of ``M`` values (the same at run time as ``nn.ModuleDict``)."""

    def __getitem__(self, key: str) -> M:
        return cast(M, super().__getitem__(key))
