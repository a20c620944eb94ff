"""Loss balancing strategies. Importing this package registers them all."""

from mtrec.balancing import (  # noqa: F401  (registration side effects)
    aligned_mtl,
    cagrad,
    dtp,
    dwa,
    famo,
    fixed,
    gradnorm,
    gradvac,
    imtl,
    mgda,
    nash_mtl,
    pcgrad,
    ple_schedule,
    rlw,
    staged,
    uncertainty,
)
from mtrec.balancing.base import BALANCERS, Balancer, StepContext, build_balancer, validate_balancer_options
from mtrec.balancing.gradient import GradientBalancer
from mtrec.balancing.options import BalancerConfig


def gradient_balancer_names() -> list[str]:
    """The registered balancers that combine per-task gradients of the shared parameters (the
    :class:`GradientBalancer` family), in registry order: the registry is the one list of them."""
    return [name for name in BALANCERS.names() if issubclass(BALANCERS.get(name), GradientBalancer)]


__all__ = [
    "BALANCERS",
    "Balancer",
    "BalancerConfig",
    "GradientBalancer",
    "StepContext",
    "build_balancer",
    "gradient_balancer_names",
    "validate_balancer_options",
]
