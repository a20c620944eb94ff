"""The interface between the trainer and the ways of combining task losses.

A balancer is an ``nn.Module`` (so learnable state, such as uncertainty
weighting's log-variances, is optimised and checkpointed with the model).
The trainer calls :meth:`Balancer.backward` once per step with the per-task
losses; a loss-level balancer only implements :meth:`combine`, while a
gradient-level balancer overrides ``backward`` to act on per-task gradients
of the shared parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mtrec.balancing.options import BalancerConfig
from mtrec.errors import MtrecError
from mtrec.options import describe_options, validate_options
from mtrec.registry import Registry

if TYPE_CHECKING:
    from mtrec.models.base import MultiTaskModel

BALANCERS: Registry[type[Balancer]] = Registry("balancer")


@dataclass
class StepContext:
    """What a balancer may look at besides the losses: where training is, the model (whose
    ``shared_slices()`` name the parameters several tasks share) and this step's shared representation
    (``ModelOutput.shared``; None when the model exposes none), which representation-level balancing
    combines gradients at."""

    step: int
    epoch: int
    model: MultiTaskModel
    shared: Tensor | None = None


class Balancer(nn.Module):
    """Combines per-task losses ``[T]`` into one scalar and back-propagates it.

    Its options are the fields of its ``Config`` (a :class:`BalancerConfig`), validated by
    :func:`validate_balancer_options` before the balancer is built; ``self.config`` holds them.
    """

    Config: ClassVar[type[BalancerConfig]] = BalancerConfig
    # plain Python attributes that carry state from step to step (besides parameters, buffers and random
    # generators, which are found by themselves): saved in checkpoints through get_extra_state
    checkpointed: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        task_names: Sequence[str],
        task_weights: Sequence[float] | None = None,
        *,
        config: BalancerConfig | None = None,
        **options: object,
    ) -> None:
        """Either an already validated ``config`` or the raw ``task_weights`` and ``options``."""
        super().__init__()
        self.task_names = list(task_names)
        self.num_tasks = len(self.task_names)
        if config is None:
            config = validate_balancer_options(type(self), self.task_names, options, task_weights)
        elif options or task_weights is not None:
            raise TypeError("give a validated config or raw options, not both")
        self.config = config
        # set by the trainer in a data-parallel run (mtrec.train.distributed.Distributed): a balancer that
        # all-reduces gradients itself (reduces_own_gradients) uses it; None in a single process
        self.distributed: Any = None

    @property
    def reduces_own_gradients(self) -> bool:
        """Under data parallelism, whether :meth:`backward` all-reduces the model's gradients itself
        instead of leaving it to DistributedDataParallel's hooks on an ordinary backward pass."""
        return False

    def get_extra_state(self) -> dict:
        """State kept outside parameters and buffers, for checkpoints: the state of every random
        generator attribute (numpy or torch; e.g. PCGrad's projection order) and the attributes named
        in ``checkpointed``; numpy arrays as tensors, so ``torch.load(weights_only=True)`` reads it."""
        out: dict[str, Any] = {}
        for name, value in vars(self).items():
            if isinstance(value, np.random.Generator):
                out[name] = {"numpy_generator": value.bit_generator.state}
            elif isinstance(value, torch.Generator):
                out[name] = {"torch_generator": value.get_state()}
        for name in self.checkpointed:
            value = getattr(self, name)
            out[name] = (
                {"array": torch.from_numpy(np.array(value))} if isinstance(value, np.ndarray) else {"value": value}
            )
        return out

    def set_extra_state(self, state: dict) -> None:
        for name, entry in state.items():
            if "numpy_generator" in entry:
                getattr(self, name).bit_generator.state = entry["numpy_generator"]
            elif "torch_generator" in entry:
                getattr(self, name).set_state(entry["torch_generator"])
            elif "array" in entry:
                setattr(self, name, entry["array"].numpy().copy())
            else:
                setattr(self, name, entry["value"])

    def combine(self, losses: Tensor, context: StepContext) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def backward(self, losses: Tensor, context: StepContext, aux_loss: Tensor | None = None) -> Tensor:
        """Default: back-propagate ``combine(losses)`` (plus the model's regulariser)."""
        total = self.combine(losses, context)
        if aux_loss is not None:
            total = total + aux_loss
        total.backward()
        return total.detach()

    def weights(self) -> dict[str, float]:
        """Current task weights, for logs."""
        return {}

    def stats(self) -> dict[str, float]:
        """Scalars logged after every step and summarised per epoch (weights, gradient cosines, ...).

        Keys are flat strings such as ``weight/income`` or ``cos/income~never_married``.
        """
        return {f"weight/{k}": v for k, v in self.weights().items()}

    def on_epoch_end(self, epoch: int, train_losses: Tensor) -> None:
        """Hook for methods that adapt per epoch (mean training loss per task given)."""

    @property
    def builds_shared_gram(self) -> bool:
        """Whether each step computes the Gram matrix of the task gradients on the shared dense elements,
        as the conflict monitor measures them (it then reads :meth:`shared_gram` instead of recomputing)."""
        return False

    def shared_gram(self) -> np.ndarray | None:
        """The last step's Gram matrix of the task gradients, when :attr:`builds_shared_gram`."""
        return None


def validate_balancer_options(
    balancer: str | type[Balancer],
    task_names: Sequence[str],
    options: Mapping[str, object] | None = None,
    task_weights: Sequence[float] | None = None,
) -> BalancerConfig:
    """``options`` (``--balancer-args``) and ``task_weights`` (``--task-weights``) as the balancer's
    ``Config``, checked against ``task_names``; any problem is one :class:`MtrecError` naming the
    balancer and the option and listing the options it takes."""
    cls = BALANCERS.get(balancer) if isinstance(balancer, str) else balancer
    name = getattr(cls, "registered_name", cls.__name__)
    merged = dict(options or {})
    if task_weights is not None:
        if "task_weights" in merged:
            raise MtrecError(f"balancer '{name}': task weights given twice (--task-weights and task_weights=)")
        merged["task_weights"] = list(task_weights)
    if "task_weights" in merged and "task_weights" not in cls.Config.model_fields:
        raise MtrecError(
            f"balancer '{name}' does not use --task-weights: {cls.Config.no_task_weights}; "
            f"its options: {describe_options(cls.Config)}"
        )
    return validate_options(cls.Config, merged, f"balancer '{name}'", context={"task_names": list(task_names)})


def build_balancer(
    name: str,
    task_names: Sequence[str],
    options: Mapping[str, object] | None = None,
    task_weights: Sequence[float] | None = None,
) -> Balancer:
    """Instantiate a registered balancer; its options are validated against its ``Config``."""
    cls = BALANCERS.get(name)
    config = validate_balancer_options(cls, task_names, options, task_weights)
    return cls(task_names, config=config)
