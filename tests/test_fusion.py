"""Score fusion: the spec and its formulas, the offline objectives (against per-user loops),
`mtrec fuse` (Optuna search, resumable study, floors, Pareto plot, test figures) and the fused
`score` column of `mtrec predict`."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from sklearn.metrics import ndcg_score, roc_auc_score

from mtrec.data.tables import FeatureLayout, TaskField
from mtrec.errors import MtrecError
from mtrec.fusion.io import SplitPredictions
from mtrec.fusion.objectives import Objective, evaluate, paired_bootstrap
from mtrec.fusion.search import pareto_mask
from mtrec.fusion.spec import Cdf, FusionSpec, TaskTerm, apply_fusion, apply_fusion_torch, load_fusion
from tests.helpers import run_main

TASKS = ["click", "like", "finish"]


def write_multitask_log(folder: Path, rows: int = 3000, users: int = 120, items: int = 150, seed: int = 0) -> Path:
    """A feed log with a user column and three binary tasks: click (item appeal x user taste),
    a sparse like (item quality), finish (quality against appeal). Returns the schema path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    user, item = rng.integers(0, users, rows), rng.integers(0, items, rows)
    taste, appeal, quality = rng.normal(size=users), rng.normal(size=items), rng.normal(size=items)
    age = rng.integers(18, 70, users)[user]
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    click = rng.random(rows) < sig(1.5 * appeal[item] + 0.8 * taste[user] * appeal[item] - 0.3)
    like = rng.random(rows) < sig(2.0 * quality[item] - 3.2 + 0.8 * click)
    finish = rng.random(rows) < sig(quality[item] - 0.6 * appeal[item] + 0.02 * (age - 40))
    lines = ["user,item,age,click,like,finish"] + [
        f"u{user[i]},i{item[i]},{age[i]},{int(click[i])},{int(like[i])},{int(finish[i])}" for i in range(rows)
    ]
    (folder / "log.csv").write_text("\n".join(lines) + "\n")
    schema = {
        "name": "feed_log",
        "source": {"train": "log.csv"},
        "split": {"valid": 0.3, "test": 0.3},
        "features": [
            {"name": "uid", "column": "user", "type": "sparse", "embed_dim": 4},
            {"name": "item", "type": "sparse", "embed_dim": 8},
            {"name": "age", "type": "dense"},
        ],
        "tasks": [{"name": t, "label": t} for t in TASKS],
        "user": "user",
    }
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


def _layout(types: list[str], names: list[str] = TASKS) -> FeatureLayout:
    return FeatureLayout([], [], [], [TaskField(n, t) for n, t in zip(names, types)])


def _random_split(
    seed: int, n: int = 900, users: int = 60, with_user: bool = True
) -> tuple[SplitPredictions, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 3)) < [0.4, 0.08, 0.5]).astype(np.float64)
    scores = np.clip(0.3 * labels + 0.7 * rng.random((n, 3)), 0, 1)
    user = rng.integers(0, users, n) * 7 + 3 if with_user else None  # sparse, unordered user keys
    fused = scores @ [0.5, 1.0, 0.2] + 0.05 * rng.random(n)
    return SplitPredictions(scores, labels, user, _layout(["binary"] * 3)), fused


# ---- objectives against brute-force per-user loops ---------------------------------------------


def test_gauc_objective_matches_a_per_user_loop() -> None:
    preds, fused = _random_split(0)
    importance = {"click": 1.0, "like": 2.0, "finish": 0.5}
    ev = evaluate(Objective.parse("gauc", importance, preds.layout), fused, preds)
    expected, per_task = 0.0, {}
    for t, name in enumerate(TASKS):
        num = den = 0.0
        for u in np.unique(preds.user):
            rows = preds.user == u
            y = preds.labels[rows, t]
            if 0 < y.sum() < len(y):  # users with one class are skipped
                num += roc_auc_score(y, fused[rows]) * rows.sum()
                den += rows.sum()
        per_task[name] = num / den
        expected += importance[name] * per_task[name]
    assert ev.value == pytest.approx(expected, abs=1e-12)
    assert ev.task_auc == pytest.approx(per_task, abs=1e-12)
    # without a user column: the global AUC
    glob = SplitPredictions(preds.scores, preds.labels, None, preds.layout)
    ev = evaluate(Objective.parse("gauc", importance, preds.layout), fused, glob)
    assert ev.value == pytest.approx(
        sum(w * roc_auc_score(preds.labels[:, TASKS.index(n)], fused) for n, w in importance.items())
    )


@pytest.mark.parametrize("k", [1, 5, 10])
def test_ndcg_and_recall_match_explicit_formulas(k: int) -> None:
    preds, fused = _random_split(1)
    importance = {"click": 1.0, "like": 3.0}
    rel = preds.labels[:, 0] * 1.0 + preds.labels[:, 1] * 3.0
    ndcgs, recalls, sk = [], [], []
    for u in np.unique(preds.user):
        rows = np.flatnonzero(preds.user == u)
        r, s = rel[rows], fused[rows]
        if r.sum() == 0:
            continue
        ranked = r[np.argsort(-s, kind="stable")]
        ideal = np.sort(r)[::-1]
        dcg = sum(ranked[i] / math.log2(i + 2) for i in range(min(k, len(r))))
        idcg = sum(ideal[i] / math.log2(i + 2) for i in range(min(k, len(r))))
        ndcgs.append(dcg / idcg)
        recalls.append(ranked[:k].sum() / r.sum())
        if len(r) > 1:
            sk.append((ndcg_score([r], [s], k=k), dcg / idcg))
    got_ndcg = evaluate(Objective.parse(f"ndcg@{k}", importance, preds.layout), fused, preds)
    got_recall = evaluate(Objective.parse(f"recall@{k}", importance, preds.layout), fused, preds)
    assert got_ndcg.value == pytest.approx(np.mean(ndcgs), abs=1e-12)
    assert got_recall.value == pytest.approx(np.mean(recalls), abs=1e-12)
    assert all(a == pytest.approx(b, abs=1e-12) for a, b in sk)  # the explicit formula is sklearn's nDCG


def test_random_lists_deal_every_row_once_into_lists_of_the_size() -> None:
    """Data without a user column: ndcg@K per list of N random rows equals the per-list formula."""
    from dataclasses import replace

    from mtrec.fusion.objectives import random_lists

    group = random_lists(1003, 100, seed=5)
    sizes = np.bincount(group)
    assert len(sizes) == 11 and (sizes[:-1] == 100).all() and sizes[-1] == 3
    assert not np.array_equal(group, np.arange(1003) // 100)  # shuffled, not the file's order
    assert np.array_equal(group, random_lists(1003, 100, seed=5))  # seeded
    preds, fused = _random_split(2, with_user=False)
    lists = random_lists(len(fused), 50, seed=0)
    rel = preds.labels[:, 0] + 2.0 * preds.labels[:, 1]
    values = []
    for g in np.unique(lists):
        r, s = rel[lists == g], fused[lists == g]
        if r.sum() == 0:
            continue
        ranked, ideal = r[np.argsort(-s, kind="stable")], np.sort(r)[::-1]
        disc = 1 / np.log2(np.arange(2, 12))
        values.append((ranked[:10] * disc[: len(ranked[:10])]).sum() / (ideal[:10] * disc[: len(ideal[:10])]).sum())
    got = evaluate(
        Objective.parse("ndcg@10", {"click": 1.0, "like": 2.0}, preds.layout), fused, replace(preds, user=lists)
    )
    assert got.value == pytest.approx(np.mean(values), abs=1e-12)


def test_paired_bootstrap_is_centred_on_the_difference() -> None:
    preds, fused = _random_split(2)
    obj = Objective.parse("gauc", {"click": 1.0}, preds.layout)
    other = preds.scores[:, 1]
    b = paired_bootstrap(obj, fused, other, preds, reps=300, seed=0)
    assert b["diff"] == pytest.approx(evaluate(obj, fused, preds).value - evaluate(obj, other, preds).value)
    assert b["lo"] < b["diff"] < b["hi"] and 0 < b["std"] < 0.2
    same = paired_bootstrap(obj, fused, fused, preds, reps=50, seed=0)
    assert same["std"] == 0.0 and same["diff"] == 0.0
    # without a user column the rows are resampled and the global AUC recomputed
    glob = SplitPredictions(preds.scores, preds.labels, None, preds.layout)
    b = paired_bootstrap(obj, fused, other, glob, reps=40, seed=0)
    diff = roc_auc_score(preds.labels[:, 0], fused) - roc_auc_score(preds.labels[:, 0], other)
    assert b["diff"] == pytest.approx(diff) and b["lo"] < diff < b["hi"] and b["std"] > 0


def test_objective_argument_errors() -> None:
    layout = _layout(["binary", "binary", "regression"])
    with pytest.raises(MtrecError, match="'map@3'"):
        Objective.parse("map@3", {"click": 1}, layout)
    with pytest.raises(MtrecError, match="'watch' is not a task"):
        Objective.parse("gauc", {"watch": 1}, layout)
    with pytest.raises(MtrecError, match="'finish' is a regression task"):
        Objective.parse("ndcg@5", {"finish": 1}, layout)


def test_pareto_mask_against_pairwise_domination() -> None:
    pts = np.random.default_rng(3).random((40, 3)).round(1)
    brute = [not any((pts[j] >= pts[i]).all() and (pts[j] > pts[i]).any() for j in range(40)) for i in range(40)]
    assert pareto_mask(pts).tolist() == brute


# ---- the spec and its formulas --------------------------------------------------------------


def test_weighted_product_and_sum_by_hand() -> None:
    scores = np.array([[0.2, 0.5], [0.4, 0.1]])
    layout = ["click", "like"]
    prod = FusionSpec(
        formula="weighted_product",
        tasks=[TaskTerm(name=layout[0], weight=1.0, bias=0.1), TaskTerm(name=layout[1], weight=2.0, bias=0.0)],
    )
    assert apply_fusion(scores, prod) == pytest.approx([0.3 * 0.5**2, 0.5 * 0.1**2])
    z = FusionSpec(
        formula="weighted_sum",
        tasks=[TaskTerm(name="click", weight=2.0, normalize="z", mean=0.3, std=0.1), TaskTerm(name="like", weight=0.5)],
    )
    assert apply_fusion(scores, z) == pytest.approx(
        [2 * (0.2 - 0.3) / 0.1 + 0.5 * 0.5, 2 * (0.4 - 0.3) / 0.1 + 0.5 * 0.1]
    )


def _full_spec() -> tuple[FusionSpec, np.ndarray]:
    rng = np.random.default_rng(4)
    valid = np.stack([rng.random(500), rng.beta(0.5, 3, 500), rng.gamma(2.0, 30.0, 500), rng.gamma(1.0, 5.0, 500)], 1)
    tasks = [
        TaskTerm(name="click", weight=0.7, normalize="rank", rank=Cdf.fit(valid[:, 0])),
        TaskTerm(name="like", weight=0.2, normalize="z", mean=float(valid[:, 1].mean()), std=float(valid[:, 1].std())),
        TaskTerm(name="watch", type="regression", weight=0.4, transform="percentile", percentile=Cdf.fit(valid[:, 2])),
        TaskTerm(name="dwell", type="regression", weight=0.1, transform="log1p"),
    ]
    return FusionSpec(formula="weighted_sum", tasks=tasks), valid


def test_rank_percentile_and_log1p_transforms() -> None:
    spec, valid = _full_spec()
    probe = np.array([[np.quantile(valid[:, 0], 0.25), 0.1, np.quantile(valid[:, 2], 0.9), 4.0]])
    inputs = [0.25, (0.1 - spec.tasks[1].mean) / spec.tasks[1].std, 0.9, math.log(5.0)]
    assert apply_fusion(probe, spec)[0] == pytest.approx(
        sum(t.weight * v for t, v in zip(spec.tasks, inputs)), abs=1e-9
    )
    # the empirical CDF on validation: the share of validation values at or below x
    x = np.linspace(valid[:, 2].min(), valid[:, 2].max(), 7)
    cdf = np.interp(x, spec.tasks[2].percentile.x, spec.tasks[2].percentile.y)
    share = (valid[:, 2][None, :] <= x[:, None]).mean(1)
    assert np.abs(cdf - share).max() < 0.01
    # outside the validation range: clamped to [0, 1]; a negative regression prediction enters log1p as 0
    extreme = np.array([[-5.0, 0.0, -1.0, -3.0], [9.0, 0.0, 1e6, 0.0]])
    assert apply_fusion(extreme, spec) == pytest.approx(
        [0.2 * (0 - spec.tasks[1].mean) / spec.tasks[1].std] * 2 + np.array([0.0, 0.7 + 0.4])
    )


def test_torch_apply_matches_numpy() -> None:
    spec, valid = _full_spec()
    rng = np.random.default_rng(5)
    scores = np.concatenate([valid, valid * rng.uniform(0.5, 1.5, valid.shape), [[-1, 2, -3, 1e4]]])
    got = apply_fusion_torch(torch.from_numpy(scores), spec).numpy()
    assert np.abs(got - apply_fusion(scores, spec)).max() < 1e-9
    prod = FusionSpec(
        formula="weighted_product",
        tasks=[
            t.model_copy(update={"normalize": "none", "rank": None, "mean": None, "std": None, "bias": 0.05})
            for t in spec.tasks
        ],
    )
    got = apply_fusion_torch(torch.from_numpy(scores), prod).numpy()
    assert np.abs(got - apply_fusion(scores, prod)).max() < 1e-9 * np.abs(got).max()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["tasks"][0].update(wieght=1), "tasks[click].wieght: unknown key"),
        (lambda d: d.update(formula="max"), "formula"),
        (lambda d: d["tasks"][1].update(bias=0.5), "bias applies to weighted_product only"),
        (lambda d: d["tasks"][0].update(normalize="rank"), "needs its fitted 'rank' grid"),
        (lambda d: d["tasks"][0].update(weight=-1), "tasks[click].weight"),
        (lambda d: d["tasks"][2].update(type="regression"), "regression task needs transform"),
        (lambda d: d.update(extra=1), "extra: unknown key"),
    ],
)
def test_spec_file_validation(edit, needle: str, tmp_path: Path) -> None:
    data = {"formula": "weighted_sum", "tasks": [{"name": t, "weight": 1.0} for t in TASKS]}
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_fusion(path).task_names == TASKS
    edit(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MtrecError) as err:
        load_fusion(path)
    assert str(path) in str(err.value) and needle in str(err.value)


# ---- mtrec fuse / predict on a trained run ---------------------------------------------------


@pytest.fixture(scope="module")
def feed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch shared-bottom run on the generated feed log (trained once for this module)."""
    from mtrec.schema import load_schema
    from mtrec.train.run import train_run
    from mtrec.train.trainer import TrainConfig

    folder = tmp_path_factory.mktemp("feed")
    schema = write_multitask_log(folder / "data")
    mp = pytest.MonkeyPatch()
    mp.setenv("MTREC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(
            load_schema(schema),
            "shared_bottom",
            folder / "run",
            TrainConfig(epochs=1, batch_size=128, lr=0.01, seed=0),
            tensorboard=False,
        )
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return folder / "run"


def _trials_in_db(run: Path) -> int:
    with sqlite3.connect(run / "fusion_study.db") as db:
        return db.execute("select count(*) from trials").fetchone()[0]


def test_fuse_searches_resumes_and_predict_writes_the_fused_score(
    feed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "fuse",
        "--run",
        str(feed_run),
        "--objective",
        "gauc",
        "--importance",
        "click=1,like=2,finish=1",
        "--seed",
        "1",
    ]
    code, out, err = run_main(capsys, *args, "--trials", "8")
    assert code == 0, err
    spec = load_fusion(feed_run / "fusion.yaml")
    assert spec.formula == "weighted_sum" and spec.task_names == TASKS and spec.search["trials"] == 8
    valid = spec.search["valid"]
    assert valid["value"] >= valid["equal_weights"]["value"]  # equal weights is trial 0 of the study
    assert set(spec.search["test"]) >= {"value", "task_auc", "equal_weights", "bootstrap"}
    assert "test   chosen" in out and "test   equal weights" in out and "paired bootstrap over users" in out
    assert (feed_run / "fusion_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _trials_in_db(feed_run) == 8

    # a second call with the same set-up resumes the stored study
    code, out, err = run_main(capsys, *args, "--trials", "3")
    assert code == 0, err
    assert load_fusion(feed_run / "fusion.yaml").search["trials"] == 11 and _trials_in_db(feed_run) == 11

    # predict: a `score` column, the weighted sum of the task scores' validation ranks (written out here)
    spec = load_fusion(feed_run / "fusion.yaml")
    data = feed_run.parent / "data" / "log.csv"
    code, _, err = run_main(
        capsys, "predict", "--run", str(feed_run), "--input", str(data), "--output", str(tmp_path / "p.csv")
    )
    assert code == 0, err
    pred = pl.read_csv(tmp_path / "p.csv")
    assert pred.columns == [*TASKS, "score"]
    expected = sum(t.weight * np.interp(pred[t.name].to_numpy(), t.rank.x, t.rank.y) for t in spec.tasks)
    assert pred["score"].to_numpy() == pytest.approx(expected, abs=1e-5)  # task columns are float32 text

    # --fusion FILE: another spec (a product written by hand) instead of the run's
    other = tmp_path / "product.yaml"
    other.write_text(
        yaml.safe_dump(
            {
                "formula": "weighted_product",
                "tasks": [
                    {"name": "click", "weight": 1.0, "bias": 0.0},
                    {"name": "like", "weight": 0.5, "bias": 0.1},
                    {"name": "finish", "weight": 0.0},
                ],
            }
        )
    )
    code, _, err = run_main(
        capsys,
        "predict",
        "--run",
        str(feed_run),
        "--input",
        str(data),
        "--output",
        str(tmp_path / "q.csv"),
        "--fusion",
        str(other),
    )
    assert code == 0, err
    q = pl.read_csv(tmp_path / "q.csv")
    assert q["score"].to_numpy() == pytest.approx(q["click"].to_numpy() * np.sqrt(q["like"].to_numpy() + 0.1), rel=1e-5)


def test_fuse_ndcg_product_and_floors(feed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "encoders.json", "model.safetensors"):
        (run / name).write_bytes((feed_run / name).read_bytes())
    code, out, err = run_main(
        capsys,
        "fuse",
        "--run",
        str(run),
        "--objective",
        "ndcg@5",
        "--importance",
        "click=1,like=3",
        "--formula",
        "weighted_product",
        "--trials",
        "6",
        "--floor",
        "finish=0.0",
    )
    assert code == 0, err
    spec = load_fusion(run / "fusion.yaml")
    assert spec.formula == "weighted_product" and spec.search["objective"] == "ndcg@5"
    assert all(1e-4 <= t.bias <= 1.0 for t in spec.tasks)
    # a floor no trial can meet: nothing is chosen, the spec on disk is left alone
    before = (run / "fusion.yaml").read_bytes()
    code, _, err = run_main(
        capsys,
        "fuse",
        "--run",
        str(run),
        "--objective",
        "gauc",
        "--importance",
        "click=1",
        "--trials",
        "3",
        "--floor",
        "like=0.999",
    )
    assert code == 2 and err.startswith("error: no trial meets the floors") and "Traceback" not in err
    assert (run / "fusion.yaml").read_bytes() == before


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--objective", "ndcg"], "'ndcg' is not gauc"),
        (["--importance", "clik=1"], "'clik' is not a task"),
        (["--importance", "click=high"], "'click' is not a number"),
        (["--floor", "click=1.5"], "not an AUC"),
        (
            ["--formula", "weighted_product", "--normalize", "rank"],
            "--normalize applies to --formula weighted_sum only",
        ),
        (["--normalize", "minmax"], "'minmax' is not one of"),
        (["--list-size", "50"], "has a user column"),
    ],
)
def test_fuse_argument_errors(extra: list[str], needle: str, feed_run: Path, capsys: pytest.CaptureFixture) -> None:
    args = {"--objective": "gauc", "--importance": "click=1", "--trials": "2"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    code, _, err = run_main(capsys, "fuse", "--run", str(feed_run), *[x for kv in args.items() for x in kv])
    assert code == 2 and err.startswith("error:") and needle in err, err


def test_predict_refuses_a_spec_for_other_tasks(feed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "fusion.yaml"
    spec.write_text(yaml.safe_dump({"formula": "weighted_sum", "tasks": [{"name": "click"}, {"name": "like"}]}))
    out = tmp_path / "p.csv"
    code, _, err = run_main(
        capsys,
        "predict",
        "--run",
        str(feed_run),
        "--input",
        str(feed_run.parent / "data" / "log.csv"),
        "--output",
        str(out),
        "--fusion",
        str(spec),
    )
    assert code == 2 and str(spec) in err and "do not match the run" in err and not out.exists()


def test_a_spec_fitted_without_calibration_is_refused_once_the_run_is_calibrated() -> None:
    spec = FusionSpec(formula="weighted_sum", tasks=[TaskTerm(name=t) for t in TASKS])
    spec.check_run(_layout(["binary"] * 3), None, "fusion.yaml")
    with pytest.raises(MtrecError, match="calibration none, but the run now has platt; re-run mtrec fuse"):
        spec.check_run(_layout(["binary"] * 3), "platt", "fusion.yaml")
