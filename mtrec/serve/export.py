"""Export a trained model to ONNX or TorchScript, with a numerical parity check, and score with ONNX Runtime.

The exported graph reads the *encoded* inputs, the tensors a :class:`~mtrec.data.tables.TensorTable`
batch holds, one graph input per kind:

- ``sparse``: ``[B, F]`` int64 ids of the sparse features (layout order; 0 padding, 1 out of vocabulary);
- ``dense``: ``[B, D]`` float32 standardised dense values (layout order);
- ``seq.<name>``: ``[B, L]`` int64 ids of each sequence feature (0 = padding).

and returns ``logit.<task>`` and ``score.<task>`` (``[B]`` each, ``score = model.predict``: a probability
for a binary task, the value for a regression task). The batch dimension is dynamic. A kind without
features has no input.

For the ranking service, features named in ``context_features`` (the user side of a request, the same
for every candidate) move to inputs ``context.sparse``, ``context.dense`` and ``context.seq.<name>`` of
batch 1, which the graph broadcasts to the candidates' batch; the candidate inputs then hold only the
other columns, still in layout order.

:class:`EncodedInputModel` is the thin wrapper that rebuilds the batch from those tensors; it is what is
traced. Export is trace-based (TorchScript ``torch.jit.trace``; ONNX through the TorchScript-based
``torch.onnx.export(..., dynamo=False)``, which needs no ``onnxscript`` and works offline). Layers that
take another code path for speed in training (the folded first layer of
:meth:`~mtrec.nn.embedding.FeatureEmbedding.linear`) take their plain path while tracing: the same map.

Before anything is written, the exported artefact is run on real rows (the run's validation split, with
ids forced to the out-of-vocabulary id on some rows) at several batch sizes, and its logits must match
PyTorch's to ``1e-5`` (absolute for binary tasks; relative to ``max(1, |value|)`` for regression tasks);
otherwise :class:`~mtrec.errors.MtrecError` names the model, the task and the difference. Files are
written to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mtrec import __version__
from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.files import write_bytes_atomic
from mtrec.models.base import MultiTaskModel

if TYPE_CHECKING:
    from mtrec.train.run import LoadedRun

FORMATS = ("onnx", "torchscript")
ONNX_FILE = "model.onnx"  # the run directory's ONNX export, used by `predict --backend onnx`
TORCHSCRIPT_FILE = "model.torchscript.pt"
OPSET = 17
TOLERANCE = 1e-5
PARITY_ROWS = 256  # rows of the validation split the parity check scores
METADATA_KEY = "mtrec"  # ONNX metadata_props key / TorchScript extra file holding the graph's description


# ---- the graph's inputs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphInput:
    """One input of the exported graph: ``kind`` ``sparse`` / ``dense`` / ``sequence``, the features its
    columns hold (in order; one for a sequence) and whether it is a batch-1 context input."""

    name: str
    kind: str
    features: tuple[str, ...]
    context: bool

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "dense" else torch.int64


def graph_inputs(layout: FeatureLayout, context_features: Sequence[str] = ()) -> list[GraphInput]:
    """The graph's inputs for ``layout``: candidate inputs first, then context inputs.

    An unknown name in ``context_features``, or context features covering every feature (nothing
    left to give the batch size), is a :class:`MtrecError`.
    """
    kinds = {f.name: "sparse" for f in layout.sparse} | {n: "dense" for n in layout.dense}
    kinds |= {s.name: "sequence" for s in layout.sequences}
    context = set(context_features)
    unknown = [n for n in context_features if n not in kinds]
    if unknown:
        raise MtrecError(
            f"context_features: unknown feature(s) {', '.join(unknown)}; the model's features are {', '.join(kinds)}"
        )
    if context and context >= set(kinds):
        raise MtrecError("context_features: every feature is a context feature; leave at least one to the candidates")
    out: list[GraphInput] = []
    for ctx in (False, True):
        prefix = "context." if ctx else ""
        for kind, names in (("sparse", [f.name for f in layout.sparse]), ("dense", list(layout.dense))):
            cols = tuple(n for n in names if (n in context) == ctx)
            if cols:
                out.append(GraphInput(prefix + kind, kind, cols, ctx))
        for s in layout.sequences:
            if (s.name in context) == ctx:
                out.append(GraphInput(f"{prefix}seq.{s.name}", "sequence", (s.name,), ctx))
    return out


def output_names(layout: FeatureLayout) -> list[str]:
    """``logit.<task>`` for every task, then ``score.<task>``, in layout task order."""
    return [f"logit.{t}" for t in layout.task_names] + [f"score.{t}" for t in layout.task_names]


class EncodedInputModel(nn.Module):
    """``forward(*inputs)`` in :func:`graph_inputs` order -> per-task logits, then per-task scores (``[B]`` each).

    Rebuilds the :class:`TensorTable` batch the model reads (context columns broadcast to the batch and
    put back at their layout columns) and applies ``model.predict``.
    """

    def __init__(self, model: MultiTaskModel, context_features: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        layout: FeatureLayout = model.layout
        self.inputs = graph_inputs(layout, context_features)
        self.num_tasks = layout.num_tasks
        self.sequence_names = [s.name for s in layout.sequences]
        self.columns = {"sparse": [f.name for f in layout.sparse], "dense": list(layout.dense)}
        # per kind: the layout column of every column of [candidate columns | context columns]
        self._identity: dict[str, bool] = {}
        for kind, names in self.columns.items():
            given = [n for i in self.inputs if i.kind == kind and not i.context for n in i.features]
            given += [n for i in self.inputs if i.kind == kind and i.context for n in i.features]
            perm = [given.index(n) for n in names]
            self.register_buffer(f"{kind}_perm", torch.tensor(perm, dtype=torch.long), persistent=False)
            self._identity[kind] = perm == list(range(len(names)))

    def feed(self, table: TensorTable) -> dict[str, Tensor]:
        """The graph's inputs for ``table``; context inputs take ``table``'s first row."""
        out: dict[str, Tensor] = {}
        for spec in self.inputs:
            if spec.kind == "sequence":
                value = table.sequences[spec.features[0]]
            else:
                names = self.columns[spec.kind]
                source = table.sparse if spec.kind == "sparse" else table.dense
                value = source[:, [names.index(n) for n in spec.features]]
            out[spec.name] = (value[:1] if spec.context else value).contiguous()
        return out

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        given = {spec.name: x for spec, x in zip(self.inputs, inputs)}
        ref = given[self.inputs[0].name]  # a candidate input (graph_inputs puts them first)
        b = ref.shape[0]
        parts: dict[str, Tensor] = {}
        for kind, dtype in (("sparse", torch.long), ("dense", torch.float32)):
            pieces = []
            if kind in given:
                pieces.append(given[kind])
            if f"context.{kind}" in given:
                ctx = given[f"context.{kind}"]
                pieces.append(ctx.expand(b, ctx.shape[1]))
            if not pieces:
                parts[kind] = ref.new_zeros((b, 0), dtype=dtype)
                continue
            x = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            parts[kind] = x if self._identity[kind] else x.index_select(1, getattr(self, f"{kind}_perm"))
        sequences = {}
        for name in self.sequence_names:
            if f"seq.{name}" in given:
                sequences[name] = given[f"seq.{name}"]
            else:
                ctx = given[f"context.seq.{name}"]
                sequences[name] = ctx.expand(b, ctx.shape[1])
        batch = TensorTable(
            sparse=parts["sparse"],
            dense=parts["dense"],
            labels=ref.new_zeros((b, self.num_tasks), dtype=torch.float32),  # read only for the batch size
            sequences=sequences,
        )
        out = self.model(batch)
        scores = self.model.predict(out)
        return (*out.logits.unbind(1), *scores.unbind(1))


# ---- parity ----------------------------------------------------------------------------------------


def with_unknown_ids(table: TensorTable) -> TensorTable:
    """A copy of ``table`` where some rows carry the out-of-vocabulary id 1: on every third row one
    sparse column (rotating) and every non-padding sequence item, and on every fifth row all sparse ids."""
    sparse = table.sparse.clone()
    n, f = sparse.shape
    rows = torch.arange(n)
    if f:
        some = rows[rows % 3 == 1]
        sparse[some, some % f] = 1
        sparse[rows % 5 == 2] = 1
    sequences = {}
    for name, ids in table.sequences.items():
        ids = ids.clone()
        pick = (rows % 3 == 1).unsqueeze(1) & (ids > 0)
        ids[pick] = 1
        sequences[name] = ids
    return TensorTable(sparse=sparse, dense=table.dense.clone(), labels=table.labels.clone(), sequences=sequences)


def _broadcast_context(table: TensorTable, wrapper: EncodedInputModel) -> TensorTable:
    """``table`` with every context column set to its first row's value: what the graph computes."""
    sparse, dense = table.sparse.clone(), table.dense.clone()
    sequences = {k: v.clone() for k, v in table.sequences.items()}
    for spec in wrapper.inputs:
        if not spec.context:
            continue
        if spec.kind == "sequence":
            sequences[spec.features[0]][:] = sequences[spec.features[0]][:1]
        else:
            target = sparse if spec.kind == "sparse" else dense
            for name in spec.features:
                col = wrapper.columns[spec.kind].index(name)
                target[:, col] = target[0, col]
    return TensorTable(sparse=sparse, dense=dense, labels=table.labels, sequences=sequences)


@dataclass
class ParityReport:
    """Largest differences between the exported artefact and PyTorch, per task, over every checked batch."""

    max_abs: dict[str, float]  # logits
    max_rel: dict[str, float]  # logits and scores, relative to max(1, |PyTorch value|)
    max_abs_score: dict[str, float]
    binary: dict[str, bool]
    batch_sizes: list[int]

    def worst(self, task: str) -> float:
        """What the tolerance applies to: absolute on a binary task's logits and probabilities,
        relative on a regression task's outputs (its score is in the label's units)."""
        return max(self.max_abs[task], self.max_abs_score[task]) if self.binary[task] else self.max_rel[task]

    def summary(self) -> str:
        diffs = ", ".join(f"{t} {self.worst(t):.2g}" for t in self.max_abs)
        return f"parity with PyTorch on batches of {self.batch_sizes} rows, max difference per task: {diffs}"


def _check(model: MultiTaskModel, fmt: str, run_graph, wrapper: EncodedInputModel, rows: TensorTable,
           sizes: Sequence[int]) -> ParityReport:
    """Run the exported graph (``run_graph(inputs) -> list of arrays``) on ``rows`` split into ``sizes``
    and compare with PyTorch; raise :class:`MtrecError` when a task is off by more than the tolerance."""
    tasks = model.layout.task_names
    binary = [t.type == "binary" for t in model.layout.tasks]
    report = ParityReport({t: 0.0 for t in tasks}, {t: 0.0 for t in tasks}, {t: 0.0 for t in tasks},
                          dict(zip(tasks, binary)), [])
    start = 0
    for size in sizes:
        table = _broadcast_context(rows.slice(start, start + size), wrapper)
        start = (start + size) % max(len(rows) - 1, 1)
        with torch.no_grad():
            out = model(table)
            ref_logits = out.logits.double().numpy()
            ref_scores = model.predict(out).double().numpy()
        got = run_graph(wrapper.feed(table))
        for t, name in enumerate(tasks):
            logit = np.asarray(got[t], dtype=np.float64).reshape(-1)
            score = np.asarray(got[len(tasks) + t], dtype=np.float64).reshape(-1)
            if logit.shape != (len(table),):
                raise MtrecError(
                    f"model '{model_name(model)}' exported to {fmt}: output 'logit.{name}' has shape {logit.shape} "
                    f"for a batch of {len(table)} rows; the batch dimension is not dynamic"
                )
            diff = np.abs(logit - ref_logits[:, t])
            report.max_abs[name] = max(report.max_abs[name], float(diff.max(initial=0.0)))
            sdiff = np.abs(score - ref_scores[:, t])
            report.max_abs_score[name] = max(report.max_abs_score[name], float(sdiff.max(initial=0.0)))
            rel = np.maximum(diff / np.maximum(1.0, np.abs(ref_logits[:, t])), sdiff / np.maximum(1.0, np.abs(ref_scores[:, t])))
            report.max_rel[name] = max(report.max_rel[name], float(rel.max(initial=0.0)))
            if (~np.isfinite(logit) & np.isfinite(ref_logits[:, t])).any():
                raise MtrecError(
                    f"model '{model_name(model)}' exported to {fmt}: parity check failed on task '{name}': "
                    f"non-finite logits where PyTorch's are finite; nothing written"
                )
        report.batch_sizes.append(len(table))
    for t, name in enumerate(tasks):
        worst = report.worst(name)
        if not worst <= TOLERANCE:
            kind = "absolute" if binary[t] else "relative"
            raise MtrecError(
                f"model '{model_name(model)}' exported to {fmt}: parity check failed on task '{name}': "
                f"max {kind} difference {worst:.3g} from PyTorch exceeds {TOLERANCE:g} "
                f"(batch sizes {report.batch_sizes}); nothing written"
            )
    return report


def model_name(model: MultiTaskModel) -> str:
    return getattr(model, "registered_name", type(model).__name__)


# ---- export ----------------------------------------------------------------------------------------


def _operator_of(err: BaseException) -> str:
    match = re.search(r"\b((?:aten|prim|onnx|quantized)::[A-Za-z0-9_.]+)", str(err))
    return match.group(1) if match else type(err).__name__


def _export_failure(model: MultiTaskModel, fmt: str, err: BaseException) -> MtrecError:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return MtrecError(
        f"model '{model_name(model)}' cannot be exported to {fmt}: operator '{_operator_of(err)}' ({first})"
    )


def _description(model: MultiTaskModel, wrapper: EncodedInputModel, extra: Optional[dict]) -> dict:
    return {
        "mtrec_version": __version__,
        "model": model_name(model),
        "tasks": [{"name": t.name, "type": t.type} for t in model.layout.tasks],
        "inputs": [
            {"name": i.name, "kind": i.kind, "features": list(i.features), "context": i.context} for i in wrapper.inputs
        ],
        "outputs": output_names(model.layout),
        **(extra or {}),
    }


def ort_session(model_bytes_or_path: bytes | str | Path, threads: Optional[int] = None):
    """An ONNX Runtime CPU session (``threads``: intra-op threads, default torch's setting)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the optimiser's notes are noise here
    source = str(model_bytes_or_path) if isinstance(model_bytes_or_path, Path) else model_bytes_or_path
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


# ---- ONNX forms of the operators the TorchScript-based exporter lacks ----------------------------------
# Compositions of ONNX operators, accurate to a few float32 ulps where the funnel models need them
# (log-probabilities near 0): expm1 and log1p use Kahan's trick near 0 instead of the cancelling
# exp(x) - 1 and log(1 + y); logaddexp is max(a, b) + log(1 + exp(-|a - b|)).


def _const(g, value: float):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))


def _onnx_expm1(g, x):
    u = g.op("Exp", x)
    um1 = g.op("Sub", u, _const(g, 1.0))
    kahan = g.op("Div", g.op("Mul", um1, x), g.op("Log", u))  # (e^x - 1) x / log(e^x): exact to a few ulps
    near = g.op("Where", g.op("Equal", u, _const(g, 1.0)), x, kahan)
    return g.op("Where", g.op("Less", g.op("Abs", x), _const(g, 0.5)), near, um1)


def _onnx_log1p(g, y):
    w = g.op("Add", y, _const(g, 1.0))
    log_w = g.op("Log", w)
    kahan = g.op("Div", g.op("Mul", log_w, y), g.op("Sub", w, _const(g, 1.0)))  # log(1 + y) y / ((1 + y) - 1)
    near = g.op("Where", g.op("Equal", w, _const(g, 1.0)), y, kahan)
    return g.op("Where", g.op("Less", g.op("Abs", y), _const(g, 0.5)), near, log_w)


def _onnx_logaddexp(g, a, b):
    gap = g.op("Neg", g.op("Abs", g.op("Sub", a, b)))
    return g.op("Add", g.op("Max", a, b), g.op("Log", g.op("Add", _const(g, 1.0), g.op("Exp", gap))))


_SYMBOLICS_REGISTERED = False


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for the duration: on a failed export the TorchScript-based exporter
    dumps its whole IR graph there (its log switch is always on in torch 2.x); the failure itself
    comes back as an exception, reported as one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _register_symbolics() -> None:
    global _SYMBOLICS_REGISTERED
    if _SYMBOLICS_REGISTERED:
        return
    for op, fn in (("expm1", _onnx_expm1), ("log1p", _onnx_log1p), ("logaddexp", _onnx_logaddexp)):
        torch.onnx.register_custom_op_symbolic(f"aten::{op}", fn, 9)
    _SYMBOLICS_REGISTERED = True


def _to_onnx(model: MultiTaskModel, wrapper: EncodedInputModel, example: dict[str, Tensor], description: dict) -> bytes:
    import onnx

    names = output_names(model.layout)
    dynamic = {i.name: {0: "batch"} for i in wrapper.inputs if not i.context} | {n: {0: "batch"} for n in names}
    _register_symbolics()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_stderr():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tuple(example.values()),
                buf,
                input_names=list(example),
                output_names=names,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as err:  # an operator without an ONNX form, a trace that fails, ...
        raise _export_failure(model, "onnx", err) from err
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(description)
    return proto.SerializeToString()


def _to_torchscript(model: MultiTaskModel, wrapper: EncodedInputModel, example: dict[str, Tensor], description: dict) -> bytes:
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, tuple(example.values()), check_trace=False)
            torch.jit.save(traced, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(description)})
    except Exception as err:
        raise _export_failure(model, "torchscript", err) from err
    return buf.getvalue()


def parity_sizes(rows: int) -> list[int]:
    """Batch sizes the parity check runs: every row at once, one row, and an odd size (dynamic batch)."""
    sizes = [rows, 1]
    if rows > 37:
        sizes.append(37)
    return sizes


def export_model(
    model: MultiTaskModel,
    fmt: str,
    path: Path,
    rows: TensorTable,
    context_features: Sequence[str] = (),
    metadata: Optional[dict] = None,
    sizes: Optional[Sequence[int]] = None,
) -> ParityReport:
    """Export ``model`` (put in eval mode) to ``path`` in ``fmt`` after checking parity on ``rows``.

    ``rows`` are encoded rows (use :func:`with_unknown_ids` to include unknown ids); ``sizes`` the
    batch sizes checked (default :func:`parity_sizes`). Writes nothing when the export or the check
    fails (:class:`MtrecError` naming the model and the operator or the difference).
    """
    if fmt not in FORMATS:
        raise MtrecError(f"--format: unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if len(rows) == 0:
        raise MtrecError(f"model '{model_name(model)}': no rows to check the export against")
    model.eval()
    wrapper = EncodedInputModel(model, context_features).eval()
    description = _description(model, wrapper, metadata)
    example = wrapper.feed(rows.slice(0, min(len(rows), 37)))
    sizes = list(sizes) if sizes is not None else parity_sizes(len(rows))
    if fmt == "onnx":
        data = _to_onnx(model, wrapper, example, description)
        session = ort_session(data)
        outputs = output_names(model.layout)

        def run_graph(inputs: dict[str, Tensor]) -> list[np.ndarray]:
            return session.run(outputs, {k: v.numpy() for k, v in inputs.items()})
    else:
        data = _to_torchscript(model, wrapper, example, description)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still supported
            loaded = torch.jit.load(io.BytesIO(data))

        def run_graph(inputs: dict[str, Tensor]) -> list[np.ndarray]:
            with torch.no_grad():
                return [o.numpy() for o in loaded(*inputs.values())]

    try:
        report = _check(model, fmt, run_graph, wrapper, rows, sizes)
    except MtrecError:
        raise
    except Exception as err:  # the runtime refused the graph
        raise _export_failure(model, fmt, err) from err
    write_bytes_atomic(Path(path), data)
    return report


# ---- runs ------------------------------------------------------------------------------------------


def weights_digest(run: Path) -> str:
    """SHA-256 of the run's weights file: an export records it, so a stale export is recognised."""
    from mtrec.train.run import WEIGHTS

    return hashlib.sha256((run / WEIGHTS).read_bytes()).hexdigest()


def parity_rows(run: Path, loaded: "LoadedRun", limit: int = PARITY_ROWS) -> TensorTable:
    """Up to ``limit`` real rows of the run's validation split (else test), encoded with the run's
    encoders, with unknown ids forced on some rows (:func:`with_unknown_ids`)."""
    from mtrec.data.ingest import encode, load_splits
    from mtrec.data.store import table_from_arrays

    splits = load_splits(loaded.schema)  # a missing or changed source file is a user error naming it
    split = "valid" if "valid" in splits and splits["valid"][0].height else "test"
    if split not in splits or splits[split][0].height == 0:
        raise MtrecError(f"{run}: the run's data has no validation or test rows to check the export against")
    frame, path = splits[split]
    table = table_from_arrays(encode(frame.head(limit), loaded.schema, loaded.encoders, path))
    return with_unknown_ids(table)


def export_run(
    run: Path,
    fmt: str,
    out: Optional[Path] = None,
    context_features: Sequence[str] = (),
    fallback_rows: Optional[TensorTable] = None,
) -> tuple[Path, ParityReport]:
    """Export a run directory's model (default file: ``model.onnx`` / ``model.torchscript.pt`` in the run).

    The parity check runs on the run's validation rows; when the run's data can no longer be read,
    on ``fallback_rows`` (encoded with the run's encoders, e.g. the rows about to be scored) if given.
    """
    from mtrec.train.run import load_run

    if fmt not in FORMATS:
        raise MtrecError(f"--format: unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    loaded = load_run(run)
    out = out if out is not None else run / (ONNX_FILE if fmt == "onnx" else TORCHSCRIPT_FILE)
    graph_inputs(loaded.model.layout, context_features)  # a bad feature name fails before any data is read
    try:
        rows = parity_rows(run, loaded)
    except MtrecError:
        if fallback_rows is None or len(fallback_rows) == 0:
            raise
        rows = with_unknown_ids(fallback_rows.slice(0, PARITY_ROWS))
    metadata = {"run": str(run.resolve()), "weights_sha256": weights_digest(run)}
    report = export_model(loaded.model, fmt, out, rows, context_features, metadata)
    return out, report


# ---- ONNX Runtime inference --------------------------------------------------------------------------


class OnnxScorer:
    """Scores encoded tables with an exported ONNX graph through ONNX Runtime."""

    def __init__(self, path: Path, threads: Optional[int] = None) -> None:
        self.session = ort_session(Path(path), threads)
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise MtrecError(f"{path}: not an ONNX file exported by mtrec (no '{METADATA_KEY}' metadata)")
        self.description = json.loads(meta)
        self.tasks = [t["name"] for t in self.description["tasks"]]
        self.inputs = [GraphInput(i["name"], i["kind"], tuple(i["features"]), i["context"]) for i in self.description["inputs"]]

    @property
    def has_context(self) -> bool:
        return any(i.context for i in self.inputs)

    def scores(self, table: TensorTable, batch_size: int = 16384) -> np.ndarray:
        """``[N, T]`` scores (``score.<task>`` outputs) of every row of ``table``; no context inputs."""
        if self.has_context:
            raise MtrecError("this ONNX graph takes batch-1 context inputs; batch scoring needs one without")
        names = [f"score.{t}" for t in self.tasks]
        out = []
        for start in range(0, len(table), batch_size):
            feed = {}
            for spec in self.inputs:
                if spec.kind == "sequence":
                    value = table.sequences[spec.features[0]][start : start + batch_size]
                else:
                    value = (table.sparse if spec.kind == "sparse" else table.dense)[start : start + batch_size]
                feed[spec.name] = np.ascontiguousarray(value.numpy())
            out.append(np.stack(self.session.run(names, feed), axis=1))
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.tasks)), np.float32)


def run_onnx(run: Path, fallback_rows: Optional[TensorTable] = None) -> Path:
    """The run's ONNX file, exported (with its parity check, see :func:`export_run` for
    ``fallback_rows``) when absent, stale (other weights) or exported with context inputs."""
    import onnx

    path = run / ONNX_FILE
    if path.is_file():
        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            meta = json.loads(props.get(METADATA_KEY, "{}"))
        except Exception:  # unreadable: export it again
            meta = {}
        fresh = meta.get("weights_sha256") == weights_digest(run)
        if fresh and not any(i.get("context") for i in meta.get("inputs", [])):
            return path
    export_run(run, "onnx", path, fallback_rows=fallback_rows)
    return path


def predict_onnx(run: Path, table: TensorTable) -> np.ndarray:
    """``[N, T]`` scores of ``table`` (encoded with the run's encoders) through ONNX Runtime."""
    return OnnxScorer(run_onnx(run, fallback_rows=table)).scores(table)
