"""Reliability of binary task scores and post-hoc calibrators fitted on the validation split.

Multiplicative fusion ``prod_i (p_i + b_i)^a_i`` treats scores as probabilities, so they should be
calibrated. Reliability is measured with the expected calibration error over equal-width bins,

    ECE = sum_b (n_b / N) * |mean(y in b) - mean(p in b)|,

and the calibration curve (per non-empty bin: score range, count, mean score, positive rate).

A calibrator maps a task's score to a calibrated probability, one per binary task, fitted on the
validation rows where the task is observed (inside its space for a funnel task):

- ``temperature``: ``sigmoid(logit(p) / T)``, T minimising the log loss (keeps the ranking);
- ``platt``: ``sigmoid(a * logit(p) + b)``, a logistic regression on the logit (scikit-learn);
- ``isotonic``: a monotone step function (scikit-learn ``IsotonicRegression``), stored as its
  thresholds and applied by linear interpolation between them, as scikit-learn does.

The fitted calibrators live in ``calibration.json`` in the run directory; ``mtrec predict``
applies them, and so can any other scorer: ``Calibrators.load(run).apply(scores)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from mtrec.data.tables import FeatureLayout
from mtrec.errors import MtrecError

CALIBRATION_FILE = "calibration.json"
METHODS = ("temperature", "platt", "isotonic")
Method = Literal["temperature", "platt", "isotonic"]
EPS = 1e-7
DEFAULT_BINS = 15


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of every score in [0, 1]; bin b holds [b/B, (b+1)/B), the last one includes 1."""
    return np.clip((np.asarray(p, np.float64) * bins).astype(np.int64), 0, bins - 1)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = DEFAULT_BINS) -> float | None:
    """ECE of probabilities ``p`` against 0/1 labels ``y`` over ``bins`` equal-width bins (None when empty)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    if len(y) == 0:
        return None
    b = _bin_index(p, bins)
    gap = np.abs(np.bincount(b, weights=y, minlength=bins) - np.bincount(b, weights=p, minlength=bins))
    return float(gap.sum() / len(y))  # sum_b n_b/N * |sum y_b - sum p_b| / n_b


def calibration_curve(y: np.ndarray, p: np.ndarray, bins: int = DEFAULT_BINS) -> list[dict]:
    """Per non-empty equal-width bin: ``{"lo", "hi", "count", "mean_score", "positive_rate"}``."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    b = _bin_index(p, bins)
    count = np.bincount(b, minlength=bins)
    pos = np.bincount(b, weights=y, minlength=bins)
    tot = np.bincount(b, weights=p, minlength=bins)
    return [
        {
            "lo": i / bins,
            "hi": (i + 1) / bins,
            "count": int(count[i]),
            "mean_score": float(tot[i] / count[i]),
            "positive_rate": float(pos[i] / count[i]),
        }
        for i in np.flatnonzero(count)
    ]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def fit_calibrator(method: Method, p: np.ndarray, y: np.ndarray) -> dict:
    """Fit one task's calibrator on scores ``p`` and 0/1 labels ``y``; returns its JSON parameters."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    if len(y) == 0 or y.min() == y.max():
        raise ValueError("needs both label classes")
    if method == "temperature":
        z = _logit(p)
        res = minimize_scalar(
            lambda log_t: log_loss(y, np.clip(_sigmoid(z / np.exp(log_t)), EPS, 1 - EPS), labels=[0, 1]),
            bounds=(-5.0, 5.0),
            method="bounded",
        )
        return {"temperature": float(np.exp(res.x))}
    if method == "platt":
        lr = LogisticRegression(C=1e10, max_iter=1000).fit(_logit(p)[:, None], y.astype(int))
        return {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
        return {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    raise MtrecError(f"--method: unknown calibration method '{method}' (choose from {', '.join(METHODS)})")


def apply_calibrator(method: str, params: dict, p: np.ndarray) -> np.ndarray:
    """A fitted calibrator applied to scores ``p`` (pure numpy)."""
    if method == "temperature":
        return _sigmoid(_logit(p) / params["temperature"])
    if method == "platt":
        return _sigmoid(params["a"] * _logit(p) + params["b"])
    if method == "isotonic":
        return np.interp(np.asarray(p, np.float64), params["x"], params["y"])
    raise ValueError(f"unknown calibration method {method!r}")


# ---- torch forms (for the exported graph): the same maps, export-friendly --------------------------------


def _isotonic_torch(p: torch.Tensor, xs: Sequence[float], ys: Sequence[float]) -> torch.Tensor:
    """``np.interp(p, xs, ys)`` in float64 with broadcast comparisons and gathers only (no
    ``searchsorted``, so it exports to ONNX opset 17), following numpy's rule case by case: below
    ``xs[0]`` -> ``ys[0]``; at or above ``xs[-1]`` -> ``ys[-1]``; otherwise the last ``j`` with
    ``xs[j] <= p`` (the last of tied thresholds), ``ys[j]`` when ``p == xs[j]``, else
    ``ys[j] + slope_j * (p - xs[j])`` with numpy's slope; NaN stays NaN."""
    x = np.asarray(xs, np.float64)
    y = np.asarray(ys, np.float64)
    fp = torch.tensor(y, dtype=torch.float64)
    if len(x) == 1:
        return torch.where(torch.isnan(p), p, fp[0].expand_as(p))
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (y[1:] - y[:-1]) / (x[1:] - x[:-1])  # numpy's own formula, in float64
    slope[~np.isfinite(slope)] = 0.0  # tied thresholds: a segment no value falls strictly inside
    xp = torch.tensor(x, dtype=torch.float64)
    j = (p.unsqueeze(-1) >= xp).sum(-1) - 1  # the last threshold at or below p; -1 below the first
    jc = j.clamp(0, len(x) - 2)
    x0, y0, s = xp[jc], fp[jc], torch.tensor(slope, dtype=torch.float64)[jc]
    inner = torch.where(p == x0, y0, s * (p - x0) + y0)
    out = torch.where(j < 0, fp[0], torch.where(j >= len(x) - 1, fp[-1], inner))
    return torch.where(torch.isnan(p), p, out)


def _logit_torch(p: torch.Tensor) -> torch.Tensor:
    # log(1 - p) rather than log1p(-p): 1 - p is exact in float64 for a float32 p, and Log exports everywhere
    p = p.clamp(EPS, 1 - EPS)
    return torch.log(p) - torch.log(1.0 - p)


def _sigmoid_torch(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(0.5 * z))  # as _sigmoid


def apply_calibrator_torch(method: str, params: dict, p: torch.Tensor) -> torch.Tensor:
    """:func:`apply_calibrator` in torch, computed in float64 (returned in float64): temperature and
    Platt are affine maps of the logit, isotonic the piecewise-linear map of its thresholds."""
    p = p.double()
    if method == "temperature":
        return _sigmoid_torch(_logit_torch(p) / float(params["temperature"]))
    if method == "platt":
        return _sigmoid_torch(float(params["a"]) * _logit_torch(p) + float(params["b"]))
    if method == "isotonic":
        return _isotonic_torch(p, params["x"], params["y"])
    raise ValueError(f"unknown calibration method {method!r}")


class Calibrators:
    """The calibrators of a run: one per binary task (None for regression tasks or without a file).

    ``apply(scores)`` maps the model's ``[N, T]`` scores (columns in the run's task order) to
    calibrated ones; a run without ``calibration.json`` gets the identity.
    """

    def __init__(self, method: str | None, task_names: Sequence[str], params: dict[str, dict | None]):
        self.method = method
        self.task_names = list(task_names)
        self.params = params

    @classmethod
    def identity(cls, task_names: Sequence[str]) -> Calibrators:
        return cls(None, task_names, {})

    @classmethod
    def fit(cls, method: Method, scores: np.ndarray, labels: np.ndarray, layout: FeatureLayout) -> Calibrators:
        """Fit on a split's scores and labels (``[N, T]``), each task on the rows where it is observed."""
        if method not in METHODS:
            raise MtrecError(f"--method: unknown calibration method '{method}' (choose from {', '.join(METHODS)})")
        params: dict[str, dict | None] = {}
        for t, task in enumerate(layout.tasks):
            if task.type != "binary":
                continue
            inside = (
                np.ones(len(labels), bool) if task.space is None else labels[:, layout.task_index(task.space)] > 0.5
            )
            try:
                params[task.name] = fit_calibrator(method, scores[inside, t], labels[inside, t])
            except ValueError:
                raise MtrecError(
                    f"task {task.name}: the validation split has one label class only; cannot calibrate"
                ) from None
        return cls(method, layout.task_names, params)

    @property
    def active(self) -> bool:
        return self.method is not None and bool(self.params)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated copy of ``scores`` ``[N, T]`` (regression columns unchanged)."""
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[1] != len(self.task_names):
            raise ValueError(f"scores must be [N, {len(self.task_names)}], got {list(scores.shape)}")
        method = self.method
        if method is None or not self.params:  # not active
            return scores
        out = scores.astype(np.float64, copy=True)
        for t, name in enumerate(self.task_names):
            params = self.params.get(name)
            if params is not None:
                out[:, t] = apply_calibrator(method, params, out[:, t])
        return out.astype(scores.dtype, copy=False)

    def apply_torch(self, scores: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` in torch (for the exported graph): ``[N, T]`` scores to calibrated ones in the
        input's dtype, each calibrator computed in float64 and rounded back, as :meth:`apply` does."""
        if scores.dim() != 2 or scores.shape[1] != len(self.task_names):
            raise ValueError(f"scores must be [N, {len(self.task_names)}], got {list(scores.shape)}")
        method = self.method
        if method is None or not self.params:  # not active
            return scores
        cols = [
            apply_calibrator_torch(method, params, scores[:, t]).to(scores.dtype)
            if (params := self.params.get(name)) is not None
            else scores[:, t]
            for t, name in enumerate(self.task_names)
        ]
        return torch.stack(cols, dim=1)

    def to_dict(self) -> dict:
        return {"method": self.method, "fitted_on": "valid", "task_names": self.task_names, "tasks": self.params}

    def save(self, run: Path) -> Path:
        from mtrec.files import write_text_atomic

        path = run / CALIBRATION_FILE
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, run: Path) -> Calibrators:
        """The calibrators saved in ``run`` (the identity when the run has none)."""
        task_names = _run_task_names(run)
        path = run / CALIBRATION_FILE
        if not path.is_file():
            return cls.identity(task_names)
        try:
            data = json.loads(path.read_text())
            method, names, params = data["method"], data["task_names"], data["tasks"]
        except (ValueError, KeyError, TypeError) as err:
            raise MtrecError(f"{path}: not a calibration file ({err}); re-run mtrec calibrate") from None
        if method not in METHODS:
            raise MtrecError(f"{path}: method '{method}' is not one of {', '.join(METHODS)}")
        if list(names) != task_names:
            raise MtrecError(f"{path}: fitted for tasks {names}, but the run has {task_names}; re-run mtrec calibrate")
        return cls(method, names, params)


def _run_task_names(run: Path) -> list[str]:
    path = run / "config.json"
    if not path.is_file():
        raise MtrecError(f"{run}: no config.json here; not a finished mtrec run")
    return [t["name"] for t in json.loads(path.read_text())["layout"]["tasks"]]


def calibration_report(
    labels: np.ndarray,
    scores: np.ndarray,
    layout: FeatureLayout,
    calibrators: Calibrators | None = None,
    bins: int = DEFAULT_BINS,
) -> dict:
    """Per binary task on one split: ECE and calibration curve of the model's scores, and of the
    calibrated scores when ``calibrators`` is active."""
    method = calibrators.method if calibrators is not None and calibrators.active else None
    calibrated = calibrators.apply(scores) if calibrators is not None and method is not None else None
    tasks: dict[str, dict] = {}
    for t, task in enumerate(layout.tasks):
        if task.type != "binary":
            continue
        inside = np.ones(len(labels), bool) if task.space is None else labels[:, layout.task_index(task.space)] > 0.5
        y = labels[inside, t]
        entry = {
            "ece": expected_calibration_error(y, scores[inside, t], bins),
            "curve": calibration_curve(y, scores[inside, t], bins),
        }
        if calibrated is not None:
            entry["ece_calibrated"] = expected_calibration_error(y, calibrated[inside, t], bins)
            entry["curve_calibrated"] = calibration_curve(y, calibrated[inside, t], bins)
        tasks[task.name] = entry
    return {"bins": bins, "method": method, "tasks": tasks}
