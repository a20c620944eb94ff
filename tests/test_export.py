"""Export to ONNX and TorchScript: parity with PyTorch for every registered model (dynamic batch, unknown
ids), batch-1 context inputs, loud failures, and `mtrec export` / `mtrec predict --backend onnx`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from mtrec.cli import app
from mtrec.data.tables import FeatureLayout, SequenceField, SparseField, TaskField, TensorTable
from mtrec.errors import MtrecError
from mtrec.fusion.calibration import Calibrators, apply_calibrator_torch, fit_calibrator
from mtrec.fusion.io import run_predictions
from mtrec.fusion.spec import FUSION_FILE, apply_fusion, build_spec
from mtrec.models import MODELS, build_model
from mtrec.models.funnel import FunnelModel
from mtrec.models.shared_bottom import SharedBottom
from mtrec.schema import load_schema
from mtrec.serve.export import (
    CONTEXT_ONNX_FILE,
    GRAPH_VERSION,
    ONNX_FILE,
    EncodedInputModel,
    embedding_columns,
    embedding_rows,
    export_model,
    with_unknown_ids,
)
from mtrec.train.run import train_run
from mtrec.train.trainer import TrainConfig
from tests.helpers import write_toy

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
# small networks keep the registry-wide test fast; each model takes the options its Config has
SMALL = {
    "tower_hidden": [8],
    "output_hidden": [8],
    "expert_hidden": [16],
    "num_experts": 2,
    "bottom_hidden": [16, 8],
    "specific_hidden": [16],
    "shared_hidden": [16],
    "subnet_hidden": [16],
    "num_subnets": 2,
    "num_critics": 2,
    "task_embed_dim": 4,
    "specific_experts": 1,
    "shared_experts": 1,
}
HIDDEN = {"cross_stitch": [16], "sluice": 16}  # the same option name, a list in one model and a width in the other


def small_options(name: str) -> dict:
    fields = MODELS.get(name).Config.model_fields
    out = {k: v for k, v in SMALL.items() if k in fields}
    if name in HIDDEN:
        out["hidden"] = HIDDEN[name]
    return out


def layout_for(name: str, layout: FeatureLayout) -> FeatureLayout:
    """Funnel models need a funnel: never_married observed on income, as in test_models_core."""
    if not issubclass(MODELS.get(name), FunnelModel):
        return layout
    return replace(layout, tasks=[layout.tasks[0], replace(layout.tasks[1], space=layout.tasks[0].name)])


def trained(name: str, layout: FeatureLayout, batch: TensorTable, steps: int = 4, **options) -> torch.nn.Module:
    """A small model after a few Adam steps (weights away from their initialisation), in eval mode."""
    torch.manual_seed(0)
    model = build_model(name, layout, small_options(name) | options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(batch)
        loss = model.losses(out, batch).sum() + (out.aux_loss if out.aux_loss is not None else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def torch_outputs(model, table: TensorTable) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(table)
        return out.logits.numpy(), model.predict(out).numpy()


@pytest.fixture(scope="module")
def census_rows(census_store) -> TensorTable:
    """Real validation rows of the Census slice, with unknown ids (id 1) forced on some of them."""
    rows = with_unknown_ids(census_store.split("valid").slice(0, 80))
    assert (rows.sparse == 1).any(1).float().mean() > 0.3  # a good share of rows carries unknown ids
    return rows


# ---- every registered model -------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_exports_to_onnx_and_torchscript_with_parity(
    name: str, census_store, census_rows, tmp_path, one_thread
) -> None:
    layout = layout_for(name, census_store.layout)
    model = trained(name, layout, census_store.split("train").slice(0, 128))
    tasks = layout.task_names
    onnx_path, ts_path = tmp_path / "m.onnx", tmp_path / "m.pt"
    export_model(model, "onnx", onnx_path, census_rows)
    export_model(model, "torchscript", ts_path, census_rows)

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["sparse", "dense"]
    assert all(isinstance(i.shape[0], str) for i in session.get_inputs())  # symbolic batch dimension
    assert [o.name for o in session.get_outputs()] == [f"logit.{t}" for t in tasks] + [f"score.{t}" for t in tasks]
    scripted = torch.jit.load(str(ts_path))

    for start, size in ((0, 37), (37, 1), (40, 37)):  # dynamic batch: neither size is the traced one alone
        table = census_rows.slice(start, start + size)
        logits, scores = torch_outputs(model, table)
        got = session.run(None, {"sparse": table.sparse.numpy(), "dense": table.dense.numpy()})
        with torch.no_grad():
            got_ts = [o.numpy() for o in scripted(table.sparse, table.dense)]
        for outputs in (got, got_ts):
            assert all(o.shape == (size,) for o in outputs)
            assert np.abs(np.stack(outputs[: len(tasks)], 1) - logits).max() <= TOL
            assert np.abs(np.stack(outputs[len(tasks) :], 1) - scores).max() <= TOL


# ---- sequences, DIN attention, a regression task, context inputs ------------------------------------


def sequence_layout_and_rows(n: int = 90) -> tuple[FeatureLayout, TensorTable]:
    layout = FeatureLayout(
        sparse=[SparseField("user", 30, 4), SparseField("item", 50, 4), SparseField("cat", 9, 8)],
        dense=["price", "age"],
        sequences=[SequenceField("history", 50, 4, 6, shares="item"), SequenceField("tags", 12, 8, 3)],
        tasks=[TaskField("click", "binary"), TaskField("watch", "regression")],
    )
    g = torch.Generator().manual_seed(1)
    history = torch.randint(2, 50, (n, 6), generator=g)
    history[torch.arange(n) % 4 == 0, 3:] = 0  # padding
    table = TensorTable(
        sparse=torch.stack([torch.randint(2, v, (n,), generator=g) for v in (30, 50, 9)], 1),
        dense=torch.randn(n, 2, generator=g),
        labels=torch.stack([(torch.rand(n, generator=g) < 0.4).float(), 20 * torch.rand(n, generator=g)], 1),
        sequences={"history": history, "tags": torch.randint(0, 12, (n, 3), generator=g)},
    )
    return layout, table


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_context_inputs_have_batch_one_and_are_broadcast(fmt: str, tmp_path, one_thread) -> None:
    """A DIN model over sequences with a regression task; user-side features given once per request."""
    layout, table = sequence_layout_and_rows()
    model = trained("mmoe", layout, table, bottom="din")
    rows = with_unknown_ids(table)
    path = tmp_path / f"m.{fmt}"
    context = ["user", "history", "age"]
    export_model(model, fmt, path, rows, context_features=context)

    candidates = rows.slice(10, 47)  # 37 candidates; the context comes from another row, row 60
    user, history, age = rows.sparse[60:61, :1], rows.sequences["history"][60:61], rows.dense[60:61, 1:]
    expected = TensorTable(
        sparse=torch.cat([user.expand(37, 1), candidates.sparse[:, 1:]], 1),
        dense=torch.cat([candidates.dense[:, :1], age.expand(37, 1)], 1),
        labels=candidates.labels,
        sequences={"history": history.expand(37, 6), "tags": candidates.sequences["tags"]},
    )
    logits, scores = torch_outputs(model, expected)
    feed = {
        "sparse": candidates.sparse[:, 1:],
        "dense": candidates.dense[:, :1],
        "seq.tags": candidates.sequences["tags"],
        "context.sparse": user,
        "context.dense": age,
        "context.seq.history": history,
    }
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in session.get_inputs()}
        assert list(shapes) == list(feed)
        assert all(shapes[k][0] == 1 for k in feed if k.startswith("context."))
        got = session.run(None, {k: v.contiguous().numpy() for k, v in feed.items()})
    else:
        with torch.no_grad():
            got = [o.numpy() for o in torch.jit.load(str(path))(*[v.contiguous() for v in feed.values()])]
    assert np.abs(got[0] - logits[:, 0]).max() <= TOL and np.abs(got[2] - scores[:, 0]).max() <= TOL
    rel = np.abs(got[3] - scores[:, 1]) / np.maximum(1.0, np.abs(scores[:, 1]))  # regression, relative
    assert rel.max() <= TOL and np.abs(got[1] - logits[:, 1]).max() <= TOL * max(1.0, np.abs(logits[:, 1]).max())
    assert len(set(np.round(got[2], 6))) > 5  # candidates still differ from each other


def _context_case(case: str, census_store, census_rows) -> tuple[FeatureLayout, TensorTable, TensorTable, list[str]]:
    """(layout, training rows, rows to check with unknown ids, context features) of a context export case."""
    if case == "census":
        return census_store.layout, census_store.split("train").slice(0, 128), census_rows, CENSUS_CONTEXT
    layout, table = sequence_layout_and_rows()
    return layout, table, with_unknown_ids(table), ["user", "history", "age"]


CENSUS_CONTEXT = ["age", "age_bucket", "education", "race", "sex", "citizenship", "birth_country"]


@pytest.mark.parametrize(
    "name,fmt,case", [("mmoe", "onnx", "census"), ("mmoe", "onnx", "sequences"), ("ple", "torchscript", "sequences")]
)
def test_context_graph_takes_the_first_layer_once(
    name: str, fmt: str, case: str, census_store, census_rows, tmp_path, one_thread
) -> None:
    """MMoE and PLE read the embedded batch in their first layer: with context inputs the graph takes the
    context features' share of it on the one context row and only the candidates' columns on every row
    (no ``[B, all columns]`` product). Its logits equal the model's on the rows with the context broadcast:
    real Census rows and rows with unknown ids, sparse fields of two embedding sizes, a sequence and a dense
    value on each side."""
    layout, train_rows, rows, context = _context_case(case, census_store, census_rows)
    model = trained(name, layout, train_rows)
    wrapper = EncodedInputModel(model, context).eval()
    assert len(wrapper.splits) == 1  # the model's embedding: its first layer is split
    columns = embedding_columns(layout)
    assert sorted(c for cols in columns.values() for c in cols) == list(range(model.embedding.output_dim))
    with torch.no_grad():  # the embedding's own output: the columns each feature holds
        emb = model.embedding(rows).squeeze(1)
        for j, f in enumerate(layout.sparse):
            rows_of_f = model.embedding.tables[str(f.embed_dim)].weight[
                rows.sparse[:, j] + embedding_rows(layout)[f.name][1]
            ]
            assert torch.equal(emb[:, columns[f.name]], rows_of_f)
        assert torch.equal(emb[:, [columns[n][0] for n in layout.dense]], rows.dense)
    path = tmp_path / f"m.{fmt}"
    report = export_model(model, fmt, path, rows, context_features=context)
    assert max(report.worst(t) for t in layout.task_names) <= TOL

    if fmt == "onnx":  # the first layer's weight is split: a [candidate columns, K] and a [context columns, K] block
        import onnx

        shapes = [tuple(i.dims) for i in onnx.load(str(path)).graph.initializer]
        n_ctx = sum(len(columns[n]) for n in context)
        n_all = model.embedding.output_dim
        k = {d[1] for d in shapes if len(d) == 2 and d[0] == n_ctx} & {
            d[1] for d in shapes if len(d) == 2 and d[0] == n_all - n_ctx
        }
        assert len(k) == 1 and (n_all, *k) not in shapes and (*k, n_all) not in shapes
    for start, size in ((0, 37), (40, 1), (5, 64)):
        picked = rows.slice(start, start + size)
        expected = _broadcast(picked, layout, context, rows, row=len(rows) - 1)  # the context of another row
        logits, scores = torch_outputs(model, expected)
        feed = {k: v.numpy() for k, v in wrapper.feed(expected).items()}
        if fmt == "onnx":
            got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
        else:
            with torch.no_grad():
                got = [o.numpy() for o in torch.jit.load(str(path))(*[torch.from_numpy(v) for v in feed.values()])]
        n = len(layout.task_names)
        assert all(o.shape == (size,) for o in got[: 2 * n])
        for t, task in enumerate(layout.tasks):
            scale = 1.0 if task.type == "binary" else np.maximum(1.0, np.abs(logits[:, t]))
            assert (np.abs(got[t] - logits[:, t]) / scale).max() <= TOL
        if size > 1:
            assert len(set(np.round(got[0], 5))) > 1  # candidates still differ from each other


def _broadcast(table: TensorTable, layout: FeatureLayout, context: list[str], source: TensorTable, row: int):
    """``table`` with the context features' values taken from row ``row`` of ``source`` on every row."""
    sparse, dense = table.sparse.clone(), table.dense.clone()
    sequences = {k: v.clone() for k, v in table.sequences.items()}
    for j, f in enumerate(layout.sparse):
        if f.name in context:
            sparse[:, j] = source.sparse[row, j]
    for j, name in enumerate(layout.dense):
        if name in context:
            dense[:, j] = source.dense[row, j]
    for name in sequences:
        if name in context:
            sequences[name][:] = source.sequences[name][row]
    return TensorTable(sparse=sparse, dense=dense, labels=table.labels, sequences=sequences)


# ---- calibration and fusion inside the graph ----------------------------------------------------------


def test_isotonic_torch_matches_numpy_at_the_edges() -> None:
    """The broadcast-comparison isotonic map against values worked by hand and np.interp: below the first
    threshold, above the last, exactly at thresholds (tied ones too), between them, ties in the input."""
    xs, ys = [0.2, 0.4, 0.4, 0.7], [0.1, 0.3, 0.5, 0.9]  # a tie at 0.4: numpy takes the last of the tied
    p = np.array([0.0, 0.19999, 0.2, 0.3, 0.3, 0.4, 0.4, 0.55, 0.7, 0.70001, 1.0, np.nan])
    by_hand = np.array([0.1, 0.1, 0.1, 0.2, 0.2, 0.5, 0.5, 0.5 + (0.4 / 0.3) * 0.15, 0.9, 0.9, 0.9, np.nan])
    got = apply_calibrator_torch("isotonic", {"x": xs, "y": ys}, torch.tensor(p)).numpy()
    np.testing.assert_allclose(got, by_hand, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(got, np.interp(p, xs, ys))  # bit for bit: the same formula as numpy's
    # a real fit on float32 scores, evaluated on the thresholds themselves, beside them and far outside
    rng = np.random.default_rng(3)
    fit_p = rng.random(400).astype(np.float32)
    params = fit_calibrator("isotonic", fit_p, (rng.random(400) < fit_p).astype(float))
    t = np.array(params["x"], np.float32)
    probe = np.concatenate([t, np.nextafter(t, 0), np.nextafter(t, 1), [-1.0, 0.0, 1.0, 2.0], fit_p]).astype(np.float32)
    got = apply_calibrator_torch("isotonic", params, torch.from_numpy(probe)).numpy()
    np.testing.assert_array_equal(got, np.interp(probe.astype(np.float64), params["x"], params["y"]))


CAL_CASES = [  # model, calibrator, fusion formula and normalisation, format
    ("mmoe", "isotonic", "weighted_product", "none", "onnx"),
    ("ple", "platt", "weighted_sum", "rank", "onnx"),
    ("shared_bottom", "temperature", "weighted_sum", "z", "torchscript"),
]


@pytest.mark.parametrize("name,method,formula,normalize,fmt", CAL_CASES)
def test_calibrated_and_fused_export_matches_the_numpy_path(
    name: str, method: str, formula: str, normalize: str, fmt: str, census_store, census_rows, tmp_path, one_thread
) -> None:
    layout = census_store.layout
    model = trained(name, layout, census_store.split("train").slice(0, 128))
    fit_rows = census_store.split("valid").slice(80, 480)  # fitted on other rows than those checked
    _, fit_scores = torch_outputs(model, fit_rows)
    calibrators = Calibrators.fit(method, fit_scores, fit_rows.labels.numpy(), layout)
    spec = build_spec(formula, layout, calibrators.apply(fit_scores), normalize=normalize, calibration=method)
    spec = spec.with_weights([1.0, 0.4], biases=[0.05, 0.1] if formula == "weighted_product" else None)
    path = tmp_path / f"m.{fmt}"
    report = export_model(model, fmt, path, census_rows, calibrators=calibrators, fusion=spec)
    assert report.calibration == method and report.max_rel_fused is not None and report.max_rel_fused <= TOL

    tasks = layout.task_names
    names = [f"logit.{t}" for t in tasks] + [f"score.{t}" for t in tasks] + [f"raw.{t}" for t in tasks] + ["score"]
    table = census_rows.slice(3, 60)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == names
        meta = json.loads(session.get_modelmeta().custom_metadata_map["mtrec"])
        assert meta["calibration"]["method"] == method and meta["fusion"]["formula"] == formula
        got = dict(zip(names, session.run(None, {"sparse": table.sparse.numpy(), "dense": table.dense.numpy()})))
    else:
        with torch.no_grad():
            got = dict(zip(names, [o.numpy() for o in torch.jit.load(str(path))(table.sparse, table.dense)]))
    _, raw_torch = torch_outputs(model, table)
    raw = np.stack([got[f"raw.{t}"] for t in tasks], 1)
    calibrated = np.stack([got[f"score.{t}"] for t in tasks], 1)
    assert np.abs(raw - raw_torch).max() <= TOL  # the model's scores, before the calibrator
    # the calibrator: the numpy map on the graph's own raw scores, and end to end on PyTorch's
    assert np.abs(calibrated - calibrators.apply(raw)).max() <= TOL
    assert np.abs(calibrated - calibrators.apply(raw_torch)).max() <= TOL
    assert np.abs(calibrated - raw).max() > 1e-3  # it did change the scores
    # the fused score: relative to numpy's on the graph's own calibrated scores. End to end the steep parts of
    # the maps (an isotonic step, a rank CDF over a Platt map that stretches these barely trained scores
    # 100-fold) amplify the model's float32 noise, hence the looser bound there
    assert got["score"].dtype == np.float64
    own = apply_fusion(calibrated, spec)
    assert (np.abs(got["score"] - own) / np.abs(own)).max() <= TOL
    assert np.abs(got["score"] - apply_fusion(calibrators.apply(raw_torch), spec)).max() <= 1e-4
    assert (
        np.abs(
            got["score"]
            - apply_fusion(
                calibrators.apply(raw_torch),
                build_spec(formula, layout, calibrators.apply(fit_scores), normalize=normalize, calibration=method),
            )
        ).max()
        > 1e-6
    )  # weights matter


# ---- loud failures ----------------------------------------------------------------------------------


class _BranchOnData(SharedBottom):
    """A model whose Python branch on the data is frozen by tracing: export cannot reproduce it."""

    def forward(self, batch, return_gates=False):
        out = super().forward(batch, return_gates)
        if bool(batch.dense[0, 0] > 0):
            out.logits = out.logits + 0.5
        return out


class _Lgamma(SharedBottom):
    """A model using an operator the ONNX exporter has no form for."""

    def forward(self, batch, return_gates=False):
        out = super().forward(batch, return_gates)
        out.logits = out.logits + 1e-3 * torch.lgamma(batch.dense[:, :1].abs() + 1.0)
        return out


def test_parity_failure_names_the_model_and_writes_nothing(census_store, census_rows, tmp_path, one_thread) -> None:
    model = _BranchOnData(census_store.layout, SharedBottom.Config(**small_options("shared_bottom")))
    # traced on a first row that takes the branch; the second row (checked alone) does not
    positive, other = (
        torch.nonzero(census_rows.dense[:, 0] > 0)[:, 0],
        torch.nonzero(census_rows.dense[:, 0] <= 0)[:, 0],
    )
    rows = census_rows.take(torch.cat([positive[:1], other[:1], positive[1:], other[1:]]))
    with pytest.raises(MtrecError, match=r"model 'shared_bottom' exported to onnx: parity check failed .* 0\.5"):
        export_model(model, "onnx", tmp_path / "m.onnx", rows)
    assert list(tmp_path.iterdir()) == []


def test_unexportable_operator_names_operator_and_model(census_store, census_rows, tmp_path, one_thread) -> None:
    model = _Lgamma(census_store.layout, SharedBottom.Config(**small_options("shared_bottom")))
    with pytest.raises(MtrecError, match=r"model 'shared_bottom' cannot be exported to onnx: operator 'aten::lgamma'"):
        export_model(model, "onnx", tmp_path / "m.onnx", census_rows)
    assert list(tmp_path.iterdir()) == []


# ---- the command line --------------------------------------------------------------------------------


def test_cli_export_and_predict_with_the_onnx_backend(tmp_path: Path, one_thread) -> None:
    schema = write_toy(tmp_path / "toy", rows=300)
    run = tmp_path / "run"
    train_run(
        load_schema(schema),
        "mmoe",
        run,
        TrainConfig(epochs=1, batch_size=64, progress=False),
        model_options={"num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
        tensorboard=False,
    )
    # new rows with unknown cities and tags
    frame = pl.read_csv(tmp_path / "toy" / "toy.csv").head(60)
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) % 3 == 0).then(pl.lit("tokyo")).otherwise(pl.col("city")).alias("city"),
        pl.when(pl.int_range(pl.len()) % 4 == 0).then(pl.lit("zz|a")).otherwise(pl.col("tags")).alias("tags"),
    )
    frame.write_csv(tmp_path / "new.csv")
    runner = CliRunner()

    # the ONNX file is exported (with its parity check) on first use
    assert not (run / ONNX_FILE).exists()
    args = ["predict", "--run", str(run), "--input", str(tmp_path / "new.csv"), "--threads", "1"]
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "onnx.csv"), "--backend", "onnx"])
    assert result.exit_code == 0, result.output
    assert (run / ONNX_FILE).is_file()
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "torch.csv")])
    assert result.exit_code == 0, result.output
    by_onnx, by_torch = pl.read_csv(tmp_path / "onnx.csv"), pl.read_csv(tmp_path / "torch.csv")
    assert by_onnx.columns == by_torch.columns == ["click", "watch"] and by_onnx.height == 60
    assert np.abs(by_onnx["click"].to_numpy() - by_torch["click"].to_numpy()).max() <= TOL
    watch_t = by_torch["watch"].to_numpy()
    assert (np.abs(by_onnx["watch"].to_numpy() - watch_t) / np.maximum(1.0, np.abs(watch_t))).max() <= TOL

    # a graph of an older layout version is exported again on use
    graph = onnx.load(str(run / ONNX_FILE))
    entry = next(p for p in graph.metadata_props if p.key == "mtrec")
    entry.value = json.dumps({**json.loads(entry.value), "graph_version": GRAPH_VERSION - 1})
    onnx.save(graph, str(run / ONNX_FILE))
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "onnx1.csv"), "--backend", "onnx"])
    assert result.exit_code == 0, result.output
    meta = json.loads(ort.InferenceSession(str(run / ONNX_FILE)).get_modelmeta().custom_metadata_map["mtrec"])
    assert meta["graph_version"] == GRAPH_VERSION

    # mtrec export, both formats, to a chosen file
    for fmt, name in (("onnx", "x.onnx"), ("torchscript", "x.pt")):
        result = runner.invoke(
            app, ["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / name), "--threads", "1"]
        )
        assert result.exit_code == 0, result.output
        assert "parity with PyTorch" in result.output and (tmp_path / name).stat().st_size > 0
    meta = ort.InferenceSession(str(tmp_path / "x.onnx")).get_modelmeta().custom_metadata_map["mtrec"]
    assert [t["name"] for t in json.loads(meta)["tasks"]] == ["click", "watch"]

    # user errors name the option; nothing is written
    result = runner.invoke(app, ["export", "--run", str(run), "--format", "tflite", "--out", str(tmp_path / "y")])
    assert isinstance(result.exception, MtrecError) and "--format" in str(result.exception)
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "z.csv"), "--backend", "tensorrt"])
    assert isinstance(result.exception, MtrecError) and "--backend" in str(result.exception)
    result = runner.invoke(app, ["export", "--run", str(run), "--context-features", "city,nope"])
    assert isinstance(result.exception, MtrecError) and "nope" in str(result.exception)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z.csv").exists()

    # the run's data gone: the first-use export checks parity on the rows being scored instead
    (tmp_path / "toy" / "toy.csv").unlink()
    (run / ONNX_FILE).unlink()
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "onnx2.csv"), "--backend", "onnx"])
    assert result.exit_code == 0, result.output
    assert (run / ONNX_FILE).is_file()
    assert np.abs(pl.read_csv(tmp_path / "onnx2.csv")["click"].to_numpy() - by_torch["click"].to_numpy()).max() <= TOL


def test_cli_calibrated_fused_export_and_predict_apply_each_step_once(tmp_path: Path, one_thread) -> None:
    """`predict --backend onnx` equals torch whether the graph includes the calibrator and the fusion (taken
    from the graph), includes a stale calibrator (its raw scores re-calibrated) or none; export options."""
    schema = write_toy(tmp_path / "toy", rows=300)
    run = tmp_path / "run"
    # trained enough that Platt's slope stays moderate (about 5 here; on a barely trained model it is in the
    # hundreds, which turns the float32 noise of the model's score into differences above the tolerance)
    train_run(
        load_schema(schema),
        "mmoe",
        run,
        TrainConfig(epochs=8, batch_size=32, lr=0.01, progress=False),
        model_options={"num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]},
        tensorboard=False,
    )
    runner = CliRunner()
    ok = lambda args: runner.invoke(app, args)  # noqa: E731
    result = ok(["calibrate", "--run", str(run), "--method", "platt"])
    assert result.exit_code == 0, result.output
    valid = run_predictions(run, ("valid",))["valid"]  # calibrated, as predict gives them
    spec = build_spec("weighted_sum", valid.layout, valid.scores, regression_transform="log1p", calibration="platt")
    spec.with_weights([1.0, 0.3]).save(run / FUSION_FILE)
    args = ["predict", "--run", str(run), "--input", str(tmp_path / "toy" / "toy.csv"), "--threads", "1"]

    def predict(backend: str) -> pl.DataFrame:
        out = tmp_path / f"{backend}.csv"
        result = ok([*args, "--output", str(out), "--backend", backend])
        assert result.exit_code == 0, result.output
        return pl.read_csv(out)

    def same(a: pl.DataFrame, b: pl.DataFrame) -> None:
        assert a.columns == b.columns == ["click", "watch", "score"]
        for c in ("click", "score"):
            assert np.abs(a[c].to_numpy() - b[c].to_numpy()).max() <= TOL, c
        w = b["watch"].to_numpy()
        assert (np.abs(a["watch"].to_numpy() - w) / np.maximum(1.0, np.abs(w))).max() <= TOL

    def meta(path: Path) -> dict:
        return json.loads(ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map["mtrec"])

    by_torch = predict("torch")
    platt = by_torch
    same(predict("onnx"), by_torch)  # model.onnx exported on first use: calibrator included, fusion applied outside
    assert meta(run / ONNX_FILE)["calibration"]["method"] == "platt" and meta(run / ONNX_FILE)["fusion"] is None

    result = ok(["export", "--run", str(run), "--fusion", "--threads", "1"])  # calibrator and fusion in the graph
    assert result.exit_code == 0, result.output
    assert "calibrated (platt)" in result.output and "fused score" in result.output
    assert meta(run / ONNX_FILE)["fusion"]["formula"] == "weighted_sum"
    assert "score" in [o.name for o in ort.InferenceSession(str(run / ONNX_FILE)).get_outputs()]
    same(predict("onnx"), by_torch)  # taken from the graph: applied once

    # the run recalibrated after the export: the graph's calibrator is stale, its raw scores are calibrated anew
    (run / FUSION_FILE).unlink()
    result = ok(["calibrate", "--run", str(run), "--method", "temperature"])
    assert result.exit_code == 0, result.output
    by_torch = predict("torch")
    assert np.abs(by_torch["click"].to_numpy() - platt["click"].to_numpy()).max() > 1e-4  # the calibrator changed
    onnx = predict("onnx")
    for c in ("click", "watch"):
        assert np.abs(onnx[c].to_numpy() - by_torch[c].to_numpy()).max() <= TOL * max(
            1.0, np.abs(by_torch[c].to_numpy()).max()
        )

    # a context graph goes to its own file; batch scoring neither uses nor overwrites it
    before = (run / ONNX_FILE).read_bytes()
    result = ok(["export", "--run", str(run), "--context-features", "age", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (run / CONTEXT_ONNX_FILE).is_file() and (run / ONNX_FILE).read_bytes() == before
    assert [i["features"] for i in meta(run / CONTEXT_ONNX_FILE)["inputs"] if i["context"]] == [["age"]]
    context_bytes = (run / CONTEXT_ONNX_FILE).read_bytes()
    predict("onnx")
    assert (run / CONTEXT_ONNX_FILE).read_bytes() == context_bytes

    # option errors: one clear error, nothing written
    (run / ONNX_FILE).unlink()
    spec.save(tmp_path / "f.yaml")  # fitted on platt scores, the run now has temperature
    for extra, message in (
        (["--fusion"], "has no fusion.yaml"),
        (["--fusion", "--fusion-file", str(tmp_path / "f.yaml")], "give one"),
        (["--fusion-file", str(tmp_path / "f.yaml")], "calibration platt"),
        (["--fusion-file", str(tmp_path / "none.yaml")], "not found"),
    ):
        result = ok(["export", "--run", str(run), *extra])
        assert isinstance(result.exception, MtrecError) and message in str(result.exception), (extra, result.output)
    (run / "calibration.json").unlink()
    result = ok(["export", "--run", str(run), "--no-calibration"])
    assert isinstance(result.exception, MtrecError) and "--no-calibration" in str(result.exception)
    assert not (run / ONNX_FILE).exists()
