"""The fusion spec (``fusion.yaml``): how a ``[N, T]`` array of task scores becomes one score.

Formulas:

- ``weighted_sum``: ``sum_i w_i * norm_i(x_i)``, ``norm_i`` being none, ``rank`` (the score's
  empirical CDF on the validation split, in [0, 1]) or ``z`` (``(x - mean) / std`` with
  validation statistics);
- ``weighted_product``: ``prod_i (x_i + b_i) ^ a_i`` (the form of Tencent's PLE deployment and
  Kuaishou), on (calibrated) probabilities.

``x_i`` is the task's score; a regression task's prediction first goes through the monotone
transform the spec names (``log1p`` of its positive part, or ``percentile``: its empirical CDF
on validation). That transform is for fusion only; it is unrelated to how the label was built.
Every statistic is fitted on the validation split and stored in the spec, so
:func:`apply_fusion` (numpy) and :func:`apply_fusion_torch` (torch, export-friendly: no
data-dependent control flow) are pure functions of the scores and the spec.

```yaml
formula: weighted_sum
calibration: null          # calibrator of the scores when the spec was fitted (mtrec calibrate)
tasks:                     # one entry per score column, in the run's task order
  - {name: click, type: binary, weight: 0.8, normalize: rank, rank: {x: [...], y: [...]}}
  - {name: watch, type: regression, weight: 0.3, transform: percentile, percentile: {x: [...], y: [...]}, normalize: none}
search: {...}              # how the spec was chosen (written by mtrec fuse; free form)
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtrec.data.tables import FeatureLayout
from mtrec.errors import MtrecError
from mtrec.files import read_yaml

FUSION_FILE = "fusion.yaml"
GRID_POINTS = 201  # quantile levels of an empirical CDF stored in the spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cdf(_Strict):
    """A monotone piecewise-linear map ``x -> y`` (``x`` strictly increasing), clamped outside."""

    x: list[float] = Field(min_length=1)
    y: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> Cdf:
        if len(self.x) != len(self.y):
            raise ValueError("x and y must have the same length")
        if any(b <= a for a, b in zip(self.x, self.x[1:])):
            raise ValueError("x must be strictly increasing")
        if any(b < a for a, b in zip(self.y, self.y[1:])):
            raise ValueError("y must be non-decreasing")
        return self

    @classmethod
    def fit(cls, values: np.ndarray, points: int = GRID_POINTS) -> Cdf:
        """Empirical CDF of ``values`` on ``points`` quantile levels; a repeated quantile keeps its
        highest level, so a mass point maps to the share of values at or below it."""
        values = np.asarray(values, np.float64)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            raise MtrecError("cannot fit a rank/percentile transform on an empty split")
        levels = np.linspace(0.0, 1.0, points)
        q = np.quantile(values, levels)
        xs, inverse = np.unique(q, return_inverse=True)
        ys = np.zeros(len(xs))
        np.maximum.at(ys, inverse, levels)
        return cls(x=xs.tolist(), y=ys.tolist())


class TaskTerm(_Strict):
    """One task's part of the fused score."""

    name: str
    type: Literal["binary", "regression"] = "binary"
    weight: float = Field(1.0, ge=0.0)  # w_i (weighted_sum) or the exponent a_i (weighted_product)
    bias: float = Field(0.0, ge=0.0)  # b_i, weighted_product only
    transform: Literal["none", "log1p", "percentile"] = "none"
    normalize: Literal["none", "rank", "z"] = "none"
    percentile: Cdf | None = None  # for transform: percentile
    rank: Cdf | None = None  # for normalize: rank
    mean: float | None = None  # for normalize: z
    std: float | None = Field(None, gt=0.0)

    # the fitted parameters of the term's transform and normalisation (present: see _consistent)
    def percentile_cdf(self) -> Cdf:
        assert self.percentile is not None, f"task {self.name}: transform percentile without its grid"
        return self.percentile

    def rank_cdf(self) -> Cdf:
        assert self.rank is not None, f"task {self.name}: normalize rank without its grid"
        return self.rank

    def z_scale(self) -> tuple[float, float]:
        """``(mean, std)`` of ``normalize: z``."""
        assert self.mean is not None and self.std is not None, f"task {self.name}: normalize z without mean/std"
        return self.mean, self.std

    @model_validator(mode="after")
    def _consistent(self) -> TaskTerm:
        if self.type == "binary" and self.transform != "none":
            raise ValueError(f"task {self.name}: transform applies to regression tasks only")
        if self.type == "regression" and self.transform == "none":
            raise ValueError(f"task {self.name}: a regression task needs transform: log1p or percentile")
        if self.transform == "percentile" and self.percentile is None:
            raise ValueError(f"task {self.name}: transform: percentile needs its fitted 'percentile' grid")
        if self.normalize == "rank" and self.rank is None:
            raise ValueError(f"task {self.name}: normalize: rank needs its fitted 'rank' grid")
        if self.normalize == "z" and (self.mean is None or self.std is None):
            raise ValueError(f"task {self.name}: normalize: z needs its fitted 'mean' and 'std'")
        return self


class FusionSpec(_Strict):
    """A fusion formula and its parameters; ``tasks`` lists every score column in order."""

    formula: Literal["weighted_sum", "weighted_product"]
    calibration: str | None = None
    tasks: list[TaskTerm] = Field(min_length=1)
    search: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FusionSpec:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate task(s): {', '.join(dupes)}")
        for t in self.tasks:
            if self.formula == "weighted_product" and t.normalize != "none":
                raise ValueError(f"task {t.name}: normalize applies to weighted_sum only")
            if self.formula == "weighted_sum" and t.bias != 0.0:
                raise ValueError(f"task {t.name}: bias applies to weighted_product only")
        if not any(t.weight > 0 for t in self.tasks):
            raise ValueError("every task weight is 0; the fused score would be constant")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def check_run(self, layout: FeatureLayout, calibration: str | None, where: str) -> None:
        """Fail with a clear error when this spec was not fitted for a run with these tasks and calibrator."""
        expected = [(t.name, t.type) for t in layout.tasks]
        found = [(t.name, t.type) for t in self.tasks]
        if found != expected:
            raise MtrecError(f"{where}: tasks {found} do not match the run's {expected} (names, types and order)")
        if self.calibration != calibration:
            raise MtrecError(
                f"{where}: fitted on scores with calibration {self.calibration or 'none'}, but the run now has "
                f"{calibration or 'none'}; re-run mtrec fuse"
            )

    def with_weights(self, weights: Sequence[float], biases: Sequence[float] | None = None) -> FusionSpec:
        """A copy with new weights (and biases for weighted_product)."""
        tasks = [
            t.model_copy(update={"weight": float(w), **({"bias": float(biases[i])} if biases is not None else {})})
            for i, (t, w) in enumerate(zip(self.tasks, weights))
        ]
        return self.model_copy(update={"tasks": tasks})

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=1 << 20)

    def save(self, path: Path) -> None:
        from mtrec.files import write_text_atomic

        write_text_atomic(path, self.to_yaml())


def build_spec(
    formula: str,
    layout: FeatureLayout,
    valid_scores: np.ndarray,
    normalize: str = "none",
    regression_transform: str = "percentile",
    calibration: str | None = None,
) -> FusionSpec:
    """A spec with equal weights (1, biases 0) whose statistics are fitted on ``valid_scores`` ``[N, T]``."""
    if formula == "weighted_product" and normalize != "none":
        raise MtrecError("--normalize applies to --formula weighted_sum only")
    terms = []
    for t, task in enumerate(layout.tasks):
        x = np.asarray(valid_scores[:, t], np.float64)
        term: dict[str, Any] = {"name": task.name, "type": task.type, "normalize": normalize}
        if task.type == "regression":
            term["transform"] = regression_transform
            if regression_transform == "percentile":
                term["percentile"] = Cdf.fit(x)
        partial = TaskTerm.model_construct(**{**term, "normalize": "none"})
        v = _transform(x, partial)
        if normalize == "rank":
            term["rank"] = Cdf.fit(v)
        elif normalize == "z":
            term["mean"], term["std"] = float(v.mean()), float(max(v.std(), 1e-12))
        terms.append(TaskTerm(**term))
    return FusionSpec(formula=formula, calibration=calibration, tasks=terms)


def _transform(x: np.ndarray, term: TaskTerm) -> np.ndarray:
    if term.transform == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    if term.transform == "percentile":
        cdf = term.percentile_cdf()
        return np.interp(x, cdf.x, cdf.y)
    return x


def _normalize(v: np.ndarray, term: TaskTerm) -> np.ndarray:
    if term.normalize == "rank":
        cdf = term.rank_cdf()
        return np.interp(v, cdf.x, cdf.y)
    if term.normalize == "z":
        mean, std = term.z_scale()
        return (v - mean) / std
    return v


def task_inputs(scores: np.ndarray, spec: FusionSpec) -> np.ndarray:
    """``[N, T]``: every column after its transform and normalisation (what the formula combines)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(spec.tasks):
        raise ValueError(f"scores must be [N, {len(spec.tasks)}] (tasks {spec.task_names}), got {list(scores.shape)}")
    return np.stack([_normalize(_transform(scores[:, i], t), t) for i, t in enumerate(spec.tasks)], axis=1)


def apply_fusion(scores: np.ndarray, spec: FusionSpec) -> np.ndarray:
    """The fused score ``[N]`` (float64) of task scores ``[N, T]`` under ``spec``."""
    v = task_inputs(scores, spec)
    w = np.array([t.weight for t in spec.tasks])
    if spec.formula == "weighted_sum":
        return v @ w
    b = np.array([t.bias for t in spec.tasks])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        return np.prod(np.power(np.maximum(v + b, 0.0), w), axis=1)


def _interp_torch(x: torch.Tensor, cdf: Cdf) -> torch.Tensor:
    """``np.interp`` with a compare-and-sum bucket search (vectorised, ONNX-exportable)."""
    xp = torch.tensor(cdf.x, dtype=x.dtype, device=x.device)
    fp = torch.tensor(cdf.y, dtype=x.dtype, device=x.device)
    if len(cdf.x) == 1:
        return fp[0].expand_as(x).clone()
    j = (x.unsqueeze(-1) >= xp).sum(-1).clamp(1, len(cdf.x) - 1)  # right end of x's segment
    x0, x1, y0, y1 = xp[j - 1], xp[j], fp[j - 1], fp[j]
    t = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return y0 + t * (y1 - y0)


def apply_fusion_torch(scores: torch.Tensor, spec: FusionSpec) -> torch.Tensor:
    """:func:`apply_fusion` in torch: ``[N, T]`` scores to ``[N]`` fused scores in the input's dtype
    (use float64 for the product of many small probabilities)."""
    if scores.dim() != 2 or scores.shape[1] != len(spec.tasks):
        raise ValueError(f"scores must be [N, {len(spec.tasks)}], got {list(scores.shape)}")
    cols = []
    for i, term in enumerate(spec.tasks):
        x = scores[:, i]
        if term.transform == "log1p":
            x = torch.log1p(x.clamp_min(0.0))
        elif term.transform == "percentile":
            x = _interp_torch(x, term.percentile_cdf())
        if term.normalize == "rank":
            x = _interp_torch(x, term.rank_cdf())
        elif term.normalize == "z":
            mean, std = term.z_scale()
            x = (x - mean) / std
        cols.append(x)
    v = torch.stack(cols, dim=1)
    w = torch.tensor([t.weight for t in spec.tasks], dtype=v.dtype, device=v.device)
    if spec.formula == "weighted_sum":
        return v @ w
    b = torch.tensor([t.bias for t in spec.tasks], dtype=v.dtype, device=v.device)
    return torch.pow((v + b).clamp_min(0.0), w).prod(dim=1)


def _field(loc: tuple, data: Any) -> str:
    """``("tasks", 1, "weight")`` -> ``tasks[click].weight`` (the entry's name when it has one)."""
    out, node = "", data
    for p in loc:
        if isinstance(p, int) and isinstance(node, list) and p < len(node):
            node = node[p]
            out += f"[{node.get('name') if isinstance(node, dict) and node.get('name') else p}]"
        else:
            node = node.get(p) if isinstance(node, dict) else None
            out += f"{'.' if out else ''}{p}"
    return out


def load_fusion(path: Path) -> FusionSpec:
    """Read and validate a fusion spec; every problem is one error naming the file and field."""
    data = read_yaml(path, "fusion spec")
    if not isinstance(data, dict):
        raise MtrecError(f"{path}: expected a mapping with 'formula' and 'tasks'")
    try:
        return FusionSpec.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = _field(tuple(first["loc"]), data) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        raise MtrecError(f"{path}: {where}: {msg}") from None


def fusion_for_run(
    run: Path, layout: FeatureLayout, calibration: str | None, path: Path | None = None
) -> FusionSpec | None:
    """The spec to apply when scoring with ``run``: ``path`` if given, else the run's
    ``fusion.yaml`` if it has one (else None), checked against the run's tasks and calibrator."""
    target = path if path is not None else run / FUSION_FILE
    if path is None and not target.is_file():
        return None
    spec = load_fusion(target)
    spec.check_run(layout, calibration, str(target))
    if "score" in spec.task_names:
        raise MtrecError(f"{target}: a task is named 'score', the fused score's column; rename the task")
    return spec
