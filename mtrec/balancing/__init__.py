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

__all__ = [
    "BALANCERS",
    "Balancer",
    "BalancerConfig",
    "GradientBalancer",
    "StepContext",
    "build_balancer",
    "validate_balancer_options",
]
