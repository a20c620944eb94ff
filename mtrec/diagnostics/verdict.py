"""Did multi-task training help? One word per model, judged against single-task baselines.

- ``well-done``: every task better than its single-task baseline;
- ``not-bad``: no task worse and at least one better;
- ``seesaw``: some tasks better, some worse;
- ``negative-transfer``: no task better and at least one worse (all worse is its usual case);
- ``neutral``: no task changed.

"Better" follows each metric's direction (AUC up, MSE down: :data:`mtrec.metrics.core.HIGHER_IS_BETTER`),
and a change counts only beyond the noise: the seed-to-seed spread measured on the data (the larger
seed standard deviation of the two models when both ran several seeds, or a spread the caller
measured, e.g. the baseline's over seeds). With one seed each and no measured spread there is no
verdict to give, and :func:`compare_to_baseline` says so instead of calling noise a change.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from mtrec.errors import MtrecError
from mtrec.metrics.core import HIGHER_IS_BETTER

VERDICTS = ("well-done", "not-bad", "seesaw", "negative-transfer", "neutral")
Values = float | Sequence[float] | None


def verdict(deltas: Sequence[float], tolerance: float | Sequence[float] = 0.0) -> str:
    """Verdict from per-task changes (positive = better than single-task); a change within its
    ``tolerance`` (one for all tasks, or one per task) is no change."""
    tol = [tolerance] * len(deltas) if isinstance(tolerance, (int, float)) else list(tolerance)
    better = sum(d > t for d, t in zip(deltas, tol))
    worse = sum(d < -t for d, t in zip(deltas, tol))
    if better and worse:
        return "seesaw"
    if worse:
        return "negative-transfer"
    if better == len(deltas) and better:
        return "well-done"
    if better:
        return "not-bad"
    return "neutral"


def _seeds(values: Values, model: str, task: str, metric: str) -> list[float]:
    if values is None or (not isinstance(values, (int, float)) and len(values) == 0):
        raise MtrecError(f"model '{model}' has no {metric} for task '{task}': a verdict needs every task")
    out = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if any(v != v for v in out):
        raise MtrecError(f"model '{model}' has a NaN {metric} for task '{task}'")
    return out


def compare_to_baseline(
    results: Mapping[str, Mapping[str, Values]],
    baseline: str = "single_task",
    metrics: Mapping[str, str] | None = None,
    noise: Mapping[str, float] | None = None,
) -> dict[str, dict]:
    """``results``: model -> task -> the metric (one value, or one per seed). ``metrics``: task -> metric
    name (default ``auc``), for its direction. ``noise``: task -> the smallest change that counts (a
    measured seed-to-seed spread); without it, both models need several seeds and the larger of their
    seed standard deviations is used.

    Returns model -> ``deltas`` (mean minus the baseline's mean, in the metric's units), ``noise``,
    ``changed`` (task -> "better" / "worse" / "noise") and ``verdict``.
    """
    if baseline not in results:
        raise MtrecError(f"no results for the baseline '{baseline}'")
    tasks = list(results[baseline])
    metric_of = {t: (metrics or {}).get(t, "auc") for t in tasks}
    unknown = sorted({m for m in metric_of.values() if m not in HIGHER_IS_BETTER})
    if unknown:
        raise MtrecError(f"no direction known for metric(s) {', '.join(unknown)}; known: {', '.join(HIGHER_IS_BETTER)}")
    base = {t: _seeds(results[baseline][t], baseline, t, metric_of[t]) for t in tasks}
    out = {}
    for model, scores in results.items():
        if model == baseline:
            continue
        extra = sorted(set(scores) - set(tasks))
        if extra:
            raise MtrecError(f"model '{model}' reports task(s) {', '.join(extra)} the baseline '{baseline}' lacks")
        deltas, noises, changed, signed = {}, {}, {}, []
        for t in tasks:
            mine = _seeds(scores.get(t), model, t, metric_of[t])
            if noise is not None and t in noise:
                n = float(noise[t])
            elif len(mine) > 1 and len(base[t]) > 1:
                n = max(statistics.stdev(mine), statistics.stdev(base[t]))
            else:
                raise MtrecError(
                    f"task '{t}': one seed for '{model}' or '{baseline}' and no measured noise; run several "
                    "seeds or pass the seed-to-seed spread (noise=), so that noise is not called a change"
                )
            d = statistics.mean(mine) - statistics.mean(base[t])
            s = d if HIGHER_IS_BETTER[metric_of[t]] else -d
            deltas[t], noises[t] = d, n
            changed[t] = "better" if s > n else "worse" if s < -n else "noise"
            signed.append(s)
        out[model] = {
            "deltas": deltas,
            "noise": noises,
            "changed": changed,
            "verdict": verdict(signed, [noises[t] for t in tasks]),
        }
    return out
