"""``mtrec fuse``: search a fusion spec's weights with Optuna on the validation split.

The study (TPE, seeded) lives in ``fusion_study.db`` (SQLite) in the run directory, named after
the search set-up (objective, importances, floors, formula, normalisation), so calling
``mtrec fuse`` again with the same set-up resumes it. The first trial of a new study is the
equal-weights spec. Every trial records each binary task's (G)AUC of the fused score;
``--floor task=x`` marks a trial whose AUC for that task is below x infeasible (an Optuna
constraint, ``Trial.set_constraint``, so TPE learns to avoid the region) and keeps it out of
the choice.

The chosen spec is written to ``fusion.yaml``; the Pareto front of per-task quality over the
trials to ``fusion_pareto.png``; and the chosen spec's figures on the TEST split are reported
beside equal weights, with a paired bootstrap of their difference.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from mtrec.errors import MtrecError
from mtrec.files import write_atomic
from mtrec.fusion.calibration import Calibrators
from mtrec.fusion.io import run_predictions
from mtrec.fusion.objectives import Objective, check_binary_tasks, evaluate, paired_bootstrap, random_lists
from mtrec.fusion.spec import FUSION_FILE, FusionSpec, apply_fusion, build_spec

STUDY_FILE = "fusion_study.db"
PARETO_FILE = "fusion_pareto.png"
BIAS_RANGE = (1e-4, 1.0)  # b_i of weighted_product, searched on a log scale


@dataclass
class FuseResult:
    spec: FusionSpec
    path: Path
    plot: Path
    trials: int  # complete trials in the study
    valid: dict
    test: dict | None
    notes: list[str] = field(default_factory=list)


def _params_to_spec(base: FusionSpec, params: dict) -> FusionSpec:
    weights = [params[f"w_{t.name}"] for t in base.tasks]
    biases = [params[f"b_{t.name}"] for t in base.tasks] if base.formula == "weighted_product" else None
    return base.with_weights(weights, biases)


def _suggest(trial, base: FusionSpec) -> FusionSpec:
    params = {f"w_{t.name}": trial.suggest_float(f"w_{t.name}", 0.0, 1.0) for t in base.tasks}
    if base.formula == "weighted_product":
        params.update({f"b_{t.name}": trial.suggest_float(f"b_{t.name}", *BIAS_RANGE, log=True) for t in base.tasks})
    return _params_to_spec(base, params)


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Rows of ``points`` (higher is better in every column) that no other row dominates."""
    ge = (points[:, None, :] >= points[None, :, :]).all(-1)
    gt = (points[:, None, :] > points[None, :, :]).any(-1)
    dominated = np.asarray((ge & gt).any(0))  # some row j >= row i everywhere and > somewhere
    return ~dominated


def plot_pareto(
    path: Path,
    tasks: list[str],
    points: np.ndarray,
    chosen: int,
    baseline: np.ndarray | None,
    title: str,
    metric: str = "AUC",
) -> None:
    """Scatter of per-task quality over the trials (every pair of tasks), the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_mask(points) if len(points) else np.zeros(0, bool)
    pairs = list(combinations(range(len(tasks)), 2)) or [(0, 0)]
    cols = min(3, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs):
        if i == j:  # one binary task: quality against trial number
            ax.scatter(np.arange(len(points)), points[:, 0], s=10, c="0.6", label="trials")
            ax.scatter(np.flatnonzero(front), points[front, 0], s=18, c="tab:red", label="Pareto front")
            ax.scatter([chosen], [points[chosen, 0]], s=120, marker="*", c="tab:blue", label="chosen")
            ax.set_xlabel("trial")
            ax.set_ylabel(f"{tasks[0]} {metric}")
        else:
            ax.scatter(points[:, i], points[:, j], s=10, c="0.6", label="trials")
            pair = points[:, [i, j]][pareto_mask(points[:, [i, j]])]
            order = np.argsort(pair[:, 0])
            ax.step(
                pair[order, 0], pair[order, 1], where="post", c="tab:red", lw=1, alpha=0.6, label="front of this pair"
            )
            ax.scatter(points[front, i], points[front, j], s=18, c="tab:red", label="Pareto front (all tasks)")
            ax.scatter(
                [points[chosen, i]], [points[chosen, j]], s=140, marker="*", c="tab:blue", zorder=5, label="chosen"
            )
            if baseline is not None:
                ax.scatter(
                    [baseline[i]], [baseline[j]], s=70, marker="s", c="tab:green", zorder=5, label="equal weights"
                )
            ax.set_xlabel(f"{tasks[i]} {metric}")
            ax.set_ylabel(f"{tasks[j]} {metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _setup_key(setup: dict) -> str:
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]


def fuse_run(
    run: Path,
    objective_text: str,
    importance: dict[str, float],
    floors: dict[str, float],
    trials: int,
    seed: int = 0,
    formula: str = "weighted_sum",
    normalize: str = "rank",
    regression_transform: str = "percentile",
    bootstrap: int = 200,
    list_size: int | None = None,
) -> FuseResult:
    """Search the weights of a fusion spec for ``run`` (see the module docstring). ``list_size``: on data
    without a user column, rank lists of that many random rows (per split, seeded) instead of one list."""
    import optuna

    if trials < 1:
        raise MtrecError("--trials must be at least 1")
    for name, x in floors.items():
        if not 0.0 <= x <= 1.0:
            raise MtrecError(f"--floor: {name}={x} is not an AUC in [0, 1]")
    preds = run_predictions(run, ("valid", "test"))
    if "valid" not in preds or len(preds["valid"].labels) == 0:
        raise MtrecError(f"{run}: the run's schema has no validation rows to fit the fusion on")
    valid, test = preds["valid"], preds.get("test")
    layout = valid.layout
    objective = Objective.parse(objective_text, importance, layout)
    if list_size is not None:
        if list_size < 2:
            raise MtrecError("--list-size must be at least 2")
        if valid.user is not None:
            raise MtrecError("--list-size: the run's schema has a user column; the ranking objectives are per user")
        if objective.kind == "gauc":
            raise MtrecError("--list-size goes with ndcg@K or recall@K; gauc without a user column is the global AUC")
        valid = replace(valid, user=random_lists(len(valid.labels), list_size, seed))
        if test is not None:
            test = replace(test, user=random_lists(len(test.labels), list_size, seed + 1))
    if floors:
        check_binary_tasks(floors, layout, "--floor")
    calibration = Calibrators.load(run).method
    base = build_spec(formula, layout, valid.scores, normalize, regression_transform, calibration)

    setup: dict[str, Any] = {
        "objective": objective.label,
        "importance": objective.importance,
        "floor": floors,
        "formula": formula,
        "normalize": normalize,
        "regression_transform": regression_transform,
        "calibration": calibration,
    }
    if list_size is not None:
        setup["list_size"] = list_size
    study_name = f"fuse-{objective.label}-{_setup_key(setup)}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(run / STUDY_FILE).resolve()}"
    # The sampler's seed moves with the trials already done, so a resumed study continues
    # deterministically instead of replaying the first call's draws.
    probe = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True)
    done = len(probe.trials)
    sampler = optuna.samplers.TPESampler(seed=seed + done, n_startup_trials=min(10, max(trials // 4, 3)))
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    if done == 0:
        study.set_user_attr("setup", setup)
        equal = {f"w_{t.name}": 1.0 for t in base.tasks}
        if formula == "weighted_product":
            equal.update({f"b_{t.name}": BIAS_RANGE[0] for t in base.tasks})
        study.enqueue_trial(equal)

    def trial_value(trial) -> float:
        spec = _suggest(trial, base)
        ev = evaluate(objective, apply_fusion(valid.scores, spec), valid)
        trial.set_user_attr("task_auc", ev.task_auc)
        for name, x in floors.items():  # feasible when <= 0; TPE models the infeasible region apart
            trial.set_constraint(f"floor_{name}", x - (ev.task_auc.get(name) or 0.0))
        return ev.value if np.isfinite(ev.value) else float("-inf")

    study.optimize(trial_value, n_trials=trials)

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t for t in complete if all(c <= 0 for c in t.constraints.values())]
    if not feasible:
        best_seen = {n: max((t.user_attrs["task_auc"].get(n) or 0.0) for t in complete) for n in floors}
        raise MtrecError(
            f"no trial meets the floors {floors} (best AUC seen per task: {best_seen}); lower --floor or add --trials"
        )
    best = max(feasible, key=lambda t: -math.inf if t.value is None else t.value)  # complete trials have one
    spec = _params_to_spec(base, best.params)

    names = [t.name for t in layout.tasks if t.type == "binary"]
    points = np.array([[t.user_attrs["task_auc"].get(n) or 0.0 for n in names] for t in feasible])
    equal_eval = evaluate(objective, apply_fusion(valid.scores, base), valid)
    baseline = np.array([equal_eval.task_auc.get(n) or 0.0 for n in names])
    plot = run / PARETO_FILE
    metric = "GAUC" if valid.user is not None else "AUC"
    plot_pareto(
        plot,
        names,
        points,
        feasible.index(best),
        baseline,
        f"{run.name}: per-task {metric} of the fused score, {len(feasible)} feasible trials (validation)",
        metric,
    )

    valid_fig = {
        "value": best.value,
        "task_auc": best.user_attrs["task_auc"],
        "equal_weights": {"value": equal_eval.value, "task_auc": equal_eval.task_auc},
    }
    test_fig = None
    notes = []
    if test is not None and len(test.labels):
        chosen_fused, equal_fused = apply_fusion(test.scores, spec), apply_fusion(test.scores, base)
        ce, ee = evaluate(objective, chosen_fused, test), evaluate(objective, equal_fused, test)
        test_fig = {
            "value": ce.value,
            "task_auc": ce.task_auc,
            "equal_weights": {"value": ee.value, "task_auc": ee.task_auc},
            "bootstrap": {
                "reps": bootstrap,
                "unit": ("list" if list_size else "user") if test.user is not None else "row",
                **paired_bootstrap(objective, chosen_fused, equal_fused, test, bootstrap, seed),
            },
        }
    else:
        notes.append("the run's schema has no test split: no test figures")
    if valid.user is None and objective.kind != "gauc":
        notes.append(f"no user column: {objective.label} ranks the whole split as one list (see --list-size)")
    elif list_size is not None:
        notes.append(f"no user column: {objective.label} per list of {list_size} random rows (bootstrap over lists)")
    spec = spec.model_copy(
        update={
            "search": {
                "objective": objective.label,
                "importance": objective.importance,
                "floor": floors,
                "study": study_name,
                "storage": STUDY_FILE,
                "trials": len(complete),
                "best_trial": best.number,
                "seed": seed,
                "valid": valid_fig,
                "test": test_fig,
            }
        }
    )
    path = run / FUSION_FILE
    spec.save(path)
    return FuseResult(spec, path, plot, len(complete), valid_fig, test_fig, notes)


def summary_yaml(spec: FusionSpec) -> str:
    """The spec without its fitted grids and search record: what a person reads."""
    import yaml

    grids: dict[str, Any] = {"search": True, "tasks": {"__all__": {"percentile", "rank"}}}
    data = spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True, exclude=grids)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def report(result: FuseResult, objective_label: str) -> str:
    """Human-readable figures of a search: validation and test, chosen against equal weights."""
    lines = [f"fusion spec (written to {result.path}):", summary_yaml(result.spec).rstrip(), ""]
    lines.append(
        f"{'split':<6} {'spec':<14} {objective_label:>10}  " + "  ".join(f"{n:>12}" for n in result.valid["task_auc"])
    )
    for split, fig in (("valid", result.valid), ("test", result.test)):
        if fig is None:
            continue
        for label, f in (("chosen", fig), ("equal weights", fig["equal_weights"])):
            aucs = "  ".join(f"{(v if v is not None else float('nan')):12.4f}" for v in f["task_auc"].values())
            lines.append(f"{split:<6} {label:<14} {f['value']:10.4f}  {aucs}")
    if result.test is not None:
        b = result.test["bootstrap"]
        lines.append(
            f"test: chosen - equal = {b['diff']:+.4f}; paired bootstrap over {b['unit']}s ({b['reps']} reps): "
            f"std {b['std']:.4f}, 95% interval [{b['lo']:+.4f}, {b['hi']:+.4f}]"
        )
    lines.append(f"{result.trials} trials in the study; Pareto front plot: {result.plot}")
    lines.extend(f"note: {n}" for n in result.notes)
    return "\n".join(lines)
