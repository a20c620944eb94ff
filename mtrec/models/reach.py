"""Which tasks' losses reach which parameters: the static sharing declaration of a model.

Gradient-level balancers act on the parameters several tasks share; GradNorm measures norms on
the last shared layer; the conflict monitor reads cosines there. All of them need the true
partition, and it does not follow module boundaries: MMoE's gates are one stacked tensor
``[T, in, E]`` of which slice ``t`` only task ``t``'s loss reaches, a PLE level's experts
``[E, in, H]`` mix shared and task-specific members, ``single_task``'s embedding table gives every
task a column block of each row, and a cross-stitch matrix's last layer has one row per task.

So a model declares, per parameter, a small integer tensor of **member ids** broadcastable to the
parameter's shape (``arange(n)`` along the stacking axis of a stack, a column block per copy of an
embedding, a single member for a plain tensor) and, per member, the set of tasks whose loss reaches
it. :class:`Sharing` holds that declaration; models write it in ``declare_sharing`` from their
structure (``tests/test_sharing.py`` checks it against per-task autograd for every registered model).

Stacked modules say how their parameters are laid out by a ``member_index(name) -> Tensor`` method
(:class:`~mtrec.nn.batched.BatchedLinear`, :class:`~mtrec.nn.bottoms.BatchedCrossNetwork`,
:class:`~mtrec.nn.embedding.FeatureEmbedding`, :class:`~mtrec.nn.bottoms.FMTerm`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Tasks = Iterable[int] | None  # None: every task


@dataclass(frozen=True)
class Reach:
    """One parameter's declaration: ``member`` (int, broadcastable to the parameter) and each member's tasks."""

    member: Tensor
    owners: tuple[frozenset[int], ...]

    def shared_members(self) -> Tensor:
        """``[M]`` bool: the members reached by more than one task."""
        return torch.tensor([len(o) > 1 for o in self.owners], dtype=torch.bool)

    def shared_mask(self, param: Tensor) -> Tensor | None:
        """Bool mask of the parameter's shared elements (its shape), or None when all or none are shared."""
        shared = self.shared_members()
        if bool(shared.all()) or not bool(shared.any()):
            return None
        return shared.to(param.device)[self.member.to(param.device)].expand(param.shape)

    @property
    def any_shared(self) -> bool:
        return any(len(o) > 1 for o in self.owners)

    @property
    def all_shared(self) -> bool:
        return all(len(o) > 1 for o in self.owners)


@dataclass(frozen=True)
class SharedSlice:
    """A parameter's shared elements: the whole tensor (``mask`` None) or the elements where ``mask`` holds."""

    param: nn.Parameter
    mask: Tensor | None = None

    def numel(self) -> int:
        return self.param.numel() if self.mask is None else int(self.mask.sum())

    def take(self, grad: Tensor) -> Tensor:
        """The slice's elements of a gradient of the parameter, flat."""
        return grad.reshape(-1) if self.mask is None else grad[self.mask]

    def put(self, grad: Tensor, values: Tensor) -> None:
        """Write flat ``values`` into the slice's elements of ``grad`` (in place)."""
        if self.mask is None:
            grad.copy_(values.view_as(grad))
        else:
            grad[self.mask] = values


def stack_members(module: nn.Module) -> dict[int, Tensor]:
    """Member ids of every parameter of a module built from stacks (id(param) -> ids).

    Every submodule holding parameters must be a stack (define ``member_index``); a plain layer
    inside has no member layout, which is a programming error in the declaration.
    """
    out: dict[int, Tensor] = {}
    claimed: set[int] = set()
    for prefix, sub in module.named_modules():
        if any(id(p) in claimed for p in sub.parameters(recurse=False)):
            continue
        if hasattr(sub, "member_index"):
            for name, p in sub.named_parameters():
                out[id(p)] = sub.member_index(name)
                claimed.add(id(p))
        elif next(sub.parameters(recurse=False), None) is not None:
            raise TypeError(f"module '{prefix}' ({type(sub).__name__}) holds parameters but is not a stack of members")
    return out


def _task_set(tasks: Tasks, num_tasks: int) -> frozenset[int]:
    return frozenset(range(num_tasks)) if tasks is None else frozenset(int(t) for t in tasks)


class Sharing:
    """A model's declaration: every parameter reached by which tasks, per member.

    ``reach(target, tasks)`` declares a whole module or parameter; ``stacked(module, owners)``
    gives member ``i`` of every stack in ``module`` the tasks ``owners[i]``; ``elements(param,
    member, owners)`` states member ids by hand. ``last_layer(*targets)`` names the last shared
    layer (where GradNorm measures gradient norms).
    """

    def __init__(self, model: nn.Module, num_tasks: int) -> None:
        self.model = model
        self.num_tasks = num_tasks
        self.entries: dict[int, Reach] = {}
        self._last: list[nn.Parameter] = []
        self._slices: dict[str, tuple[torch.device, list[SharedSlice]]] = {}

    def _add(self, p: nn.Parameter, reach: Reach) -> None:
        if id(p) in self.entries:
            raise ValueError(f"parameter of shape {tuple(p.shape)} declared twice")
        self.entries[id(p)] = reach

    def reach(self, target: nn.Module | nn.Parameter | None, tasks: Tasks = None) -> Sharing:
        """Every element of ``target`` reached by ``tasks`` (default: every task)."""
        if target is None:
            return self
        owners = (_task_set(tasks, self.num_tasks),)
        params = [target] if isinstance(target, nn.Parameter) else list(target.parameters())
        for p in params:
            self._add(p, Reach(torch.zeros((), dtype=torch.long), owners))
        return self

    def stacked(self, module: nn.Module | None, owners: Sequence[Tasks]) -> Sharing:
        """Member ``i`` of every stack in ``module`` reached by ``owners[i]`` (None: every task)."""
        if module is None:
            return self
        sets = tuple(_task_set(o, self.num_tasks) for o in owners)
        params = dict((id(p), p) for p in module.parameters())
        for pid, member in stack_members(module).items():
            if int(member.max()) + 1 != len(sets):
                raise ValueError(f"a stack of {int(member.max()) + 1} members declared with {len(sets)} owners")
            self._add(params[pid], Reach(member, sets))
        return self

    def per_task(self, module: nn.Module | None) -> Sharing:
        """A stack with one member per task (towers, per-task networks, gates)."""
        return self.stacked(module, [[t] for t in range(self.num_tasks)])

    def elements(self, param: nn.Parameter, member: Tensor, owners: Sequence[Tasks]) -> Sharing:
        """``param`` with explicit member ids (broadcastable to its shape)."""
        self._add(param, Reach(member, tuple(_task_set(o, self.num_tasks) for o in owners)))
        return self

    def last_layer(self, *targets: nn.Module | nn.Parameter | None) -> Sharing:
        """The last shared layer: its shared elements are where GradNorm measures norms."""
        for t in targets:
            if t is not None:
                self._last.extend([t] if isinstance(t, nn.Parameter) else list(t.parameters(recurse=False)))
        return self

    # ---- derived views ------------------------------------------------------------------
    def check_complete(self) -> None:
        missing = [n for n, p in self.model.named_parameters() if id(p) not in self.entries]
        if missing:
            raise ValueError(f"{type(self.model).__name__} declares no sharing for: {', '.join(missing)}")

    def of(self, p: nn.Parameter) -> Reach:
        return self.entries[id(p)]

    def slices(self, params: Iterable[nn.Parameter]) -> list[SharedSlice]:
        """The shared elements of ``params`` that have any."""
        out = []
        for p in params:
            r = self.entries[id(p)]
            if r.any_shared:
                out.append(SharedSlice(p, r.shared_mask(p)))
        return out

    def _cached(self, key: str, params: Iterable[nn.Parameter]) -> list[SharedSlice]:
        """:meth:`slices`, built once per device: the balancers and the monitor ask every step."""
        device = next(self.model.parameters()).device
        hit = self._slices.get(key)
        if hit is None or hit[0] != device:
            hit = (device, self.slices(params))
            self._slices[key] = hit
        return hit[1]

    def shared_slices(self) -> list[SharedSlice]:
        return self._cached("shared", self.model.parameters())

    def last_shared_slices(self) -> list[SharedSlice]:
        return self._cached("last", self._last)
