"""From task scores to one ranking score: calibration, score fusion and its search.

- :mod:`mtrec.fusion.calibration`: reliability (ECE, calibration curve) and post-hoc calibrators
  fitted on the validation split (``calibration.json`` in the run directory).
- :mod:`mtrec.fusion.spec`: the fusion spec (``fusion.yaml``) and the pure functions that turn a
  ``[N, T]`` score array into one fused score (numpy and torch).
- :mod:`mtrec.fusion.objectives`: offline ranking objectives (GAUC, nDCG@K, recall@K per user).
- :mod:`mtrec.fusion.search`: the Optuna search of a spec's parameters (``mtrec fuse``).
"""

from mtrec.fusion.calibration import Calibrators, expected_calibration_error
from mtrec.fusion.spec import FusionSpec, apply_fusion, apply_fusion_torch, load_fusion

__all__ = [
    "Calibrators",
    "FusionSpec",
    "apply_fusion",
    "apply_fusion_torch",
    "expected_calibration_error",
    "load_fusion",
]
