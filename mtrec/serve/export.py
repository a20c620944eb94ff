"""Export a trained model to ONNX or TorchScript, with a numerical parity check, and score with ONNX Runtime.

The exported graph reads the *encoded* inputs, the tensors a :class:`~mtrec.data.tables.TensorTable`
batch holds, one graph input per kind:

- ``sparse``: ``[B, F]`` int64 ids of the sparse features (layout order; 0 padding, 1 out of vocabulary);
- ``dense``: ``[B, D]`` float32 standardised dense values (layout order);
- ``seq.<name>``: ``[B, L]`` int64 ids of each sequence feature (0 = padding).

and returns ``logit.<task>`` and ``score.<task>`` (``[B]`` each, ``score = model.predict``: a probability
for a binary task, the value for a regression task). The batch dimension is dynamic. A kind without
features has no input.

Optionally the graph also holds what turns those scores into a ranking score, so a consumer needs
nothing but the graph:

- the run's calibrator (``calibration.json``, included by default when the run has one): then
  ``score.<task>`` is the calibrated score and ``raw.<task>`` the model's score before it
  (:meth:`~mtrec.fusion.calibration.Calibrators.apply_torch`, the numpy map in float64);
- a fusion spec (``fusion.yaml``): then ``score`` (``[B]``, float64) is the fused ranking score of the
  (calibrated) ``score.<task>`` columns (:func:`~mtrec.fusion.spec.apply_fusion_torch`).

The graph's metadata (``mtrec`` key) says what it includes: ``calibration`` and ``fusion`` (each
``null`` or with the method / formula and the SHA-256 of the parameters), the inputs, their columns,
the outputs; consumers (``predict --backend onnx``, the service) read it so nothing is applied twice.

For the ranking service, features named in ``context_features`` (the user side of a request, the same
for every candidate) move to inputs ``context.sparse``, ``context.dense`` and ``context.seq.<name>`` of
batch 1, which the graph broadcasts to the candidates' batch; the candidate inputs then hold only the
other columns, still in layout order. In a model whose first layer reads the embedded batch (MMoE,
OMoE, PLE: their experts and gates as one ``x @ W + b``), the graph takes the context features' share
of that layer once, on the context row, and the candidates' share from the candidate inputs
(:class:`_ContextFirstLayer`): on Census with the user side as context, about a quarter of the
largest product of the model. (Folding the candidates' share into per-id tables, ``E_f @ W_f``
looked up and summed, was measured too: in ONNX Runtime the gathered 1040-wide rows cost about 4x
the product they replace, so the product stays.) The run's graph for the service is ``RUN/model.context.onnx``
(:data:`CONTEXT_ONNX_FILE`, what ``mtrec export --context-features ...`` writes by default); the
batch-scoring graph ``RUN/model.onnx`` never has context inputs, so neither overwrites the other.

:class:`EncodedInputModel` is the thin wrapper that rebuilds the batch from those tensors; it is what is
traced. Export is trace-based (TorchScript ``torch.jit.trace``; ONNX through the TorchScript-based
``torch.onnx.export(..., dynamo=False)``, which needs no ``onnxscript`` and works offline). Layers that
take another code path for speed in training (the folded first layer of
:meth:`~mtrec.nn.embedding.FeatureEmbedding.linear`) take their plain path while tracing: the same map.

Before anything is written, the exported artefact is run on real rows (the run's validation split, with
ids forced to the out-of-vocabulary id on some rows) at several batch sizes, and its logits must match
PyTorch's to ``1e-5`` (absolute for binary tasks; relative to ``max(1, |value|)`` for regression tasks);
otherwise :class:`~mtrec.errors.MtrecError` names the model, the task and the difference. A calibrated
score must match the numpy calibrator applied to the graph's own ``raw.<task>`` on the same rows to
``1e-5`` (absolute), the fused score :func:`~mtrec.fusion.spec.apply_fusion` of the graph's own
``score.<task>`` to ``1e-5`` relative: each stage is checked on the same inputs, since a step of an
isotonic map amplifies a one-ulp difference of its input. Files are written to a temporary name and
renamed into place.
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
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mtrec import __version__
from mtrec.data.tables import FeatureLayout, TensorTable
from mtrec.errors import MtrecError
from mtrec.files import write_bytes_atomic
from mtrec.fusion.calibration import Calibrators
from mtrec.fusion.spec import FusionSpec, apply_fusion, apply_fusion_torch
from mtrec.models.base import MultiTaskModel
from mtrec.serve import SPIN_MODES, SpinMode

if TYPE_CHECKING:
    from mtrec.nn.embedding import FeatureEmbedding
    from mtrec.train.run import LoadedRun

FORMATS = ("onnx", "torchscript")
ONNX_FILE = "model.onnx"  # the run directory's ONNX export, used by `predict --backend onnx`
TORCHSCRIPT_FILE = "model.torchscript.pt"
CONTEXT_ONNX_FILE = "model.context.onnx"  # the run's graph with batch-1 context inputs, used by the service
CONTEXT_TORCHSCRIPT_FILE = "model.context.torchscript.pt"
FUSED_OUTPUT = "score"  # the fused ranking score's output, when the graph includes a fusion spec
OPSET = 17
TOLERANCE = 1e-5
PARITY_ROWS = 256  # rows of the validation split the parity check scores
METADATA_KEY = "mtrec"  # ONNX metadata_props key / TorchScript extra file holding the graph's description
# the graph's layout version: 2 takes the context features' share of a first layer once per request
# (:class:`_ContextFirstLayer`); 3 mixes the experts with one batched MatMul instead of an Einsum
# (:func:`~mtrec.nn.mixture.mix_experts`); a run's context graph of an older version is exported again
GRAPH_VERSION = 3


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


def output_names(layout: FeatureLayout, calibrated: bool = False, fused: bool = False) -> list[str]:
    """``logit.<task>`` for every task, then ``score.<task>``, in layout task order; then, for a graph
    with a calibrator, ``raw.<task>`` (the scores before it), and for one with a fusion spec ``score``."""
    tasks = layout.task_names
    names = [f"logit.{t}" for t in tasks] + [f"score.{t}" for t in tasks]
    if calibrated:
        names += [f"raw.{t}" for t in tasks]
    return names + ([FUSED_OUTPUT] if fused else [])


def calibration_digest(calibrators: Calibrators) -> str:
    """SHA-256 of a run's calibrators (method, tasks, parameters): what a graph records of the
    calibrator it includes, so a consumer knows whether it is the run's current one."""
    return hashlib.sha256(json.dumps(calibrators.to_dict(), sort_keys=True).encode()).hexdigest()


def fusion_digest(spec: FusionSpec) -> str:
    """SHA-256 of a fusion spec's scoring content (formula, calibration, task terms; not ``search``)."""
    return hashlib.sha256(spec.model_dump_json(exclude={"search"}).encode()).hexdigest()


def embedding_columns(layout: FeatureLayout) -> dict[str, list[int]]:
    """Feature -> its columns in :class:`~mtrec.nn.embedding.FeatureEmbedding`'s output ``[B, D]``
    (one copy): sparse fields by embedding size ascending, layout order within a size, then every
    sequence in layout order, then the dense values."""
    out: dict[str, list[int]] = {}
    pos = 0
    for d in sorted({f.embed_dim for f in layout.sparse}):
        for f in layout.sparse:
            if f.embed_dim == d:
                out[f.name] = list(range(pos, pos + d))
                pos += d
    for s in layout.sequences:
        out[s.name] = list(range(pos, pos + s.embed_dim))
        pos += s.embed_dim
    for name in layout.dense:
        out[name] = [pos]
        pos += 1
    return out


def embedding_rows(layout: FeatureLayout) -> dict[str, tuple[int, int]]:
    """Sparse feature -> (embedding size, row of its id 0 in the table of that size): the rows of a
    :class:`~mtrec.nn.embedding.FeatureEmbedding` table go to its sparse fields in layout order first."""
    used: dict[int, int] = defaultdict(int)
    out: dict[str, tuple[int, int]] = {}
    for f in layout.sparse:
        out[f.name] = (f.embed_dim, used[f.embed_dim])
        used[f.embed_dim] += f.vocab_size
    return out


class _ContextFirstLayer(nn.Module):
    """The first layer of a model whose experts and gates read the embedded batch
    (:meth:`~mtrec.nn.embedding.FeatureEmbedding.linear`: MMoE, OMoE, PLE), for a graph with context
    inputs: ``x @ W + b`` as ``x_cand @ W_cand + (b + x_ctx @ W_ctx)``, where ``x_ctx`` is the context
    features' embedded values of the one context row (``[1, ...]``, computed once per request) and
    ``x_cand`` the candidate features' embedded values, looked up straight from the graph's candidate
    inputs (so neither the context columns of every row nor the full embedded batch is built). The
    same map; only the order of the sums changes, and the export's parity check bounds the difference.

    Set as the embedding's ``first_layer_override`` while :class:`EncodedInputModel` runs (so while it
    is traced for export), never in training; ``given`` holds the graph's inputs of the call.
    """

    embedding: FeatureEmbedding
    given: dict[str, Tensor]
    context_w_rows: Tensor
    candidate_w_rows: Tensor

    def __init__(self, embedding: FeatureEmbedding, layout: FeatureLayout, inputs: Sequence[GraphInput]) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: the model owns it
        self.given: dict[str, Tensor] = {}
        columns = embedding_columns(layout)
        rows = embedding_rows(layout)
        self.sides: dict[str, list[tuple]] = {}
        for prefix in ("", "context."):
            plan: list[tuple] = []
            w_rows: list[int] = []
            for spec in inputs:
                if spec.context != (prefix == "context.") or spec.kind == "dense":
                    continue
                if spec.kind == "sparse":
                    for d in sorted({rows[n][0] for n in spec.features}):
                        pos = [i for i, n in enumerate(spec.features) if rows[n][0] == d]
                        key = f"{prefix}sparse.{d}".replace(".", "_")
                        self.register_buffer(f"{key}_pos", torch.tensor(pos), persistent=False)
                        offsets = [rows[spec.features[i]][1] for i in pos]
                        self.register_buffer(f"{key}_off", torch.tensor(offsets), persistent=False)
                        plan.append(("sparse", spec.name, d, key, pos == list(range(len(spec.features)))))
                        w_rows += [c for i in pos for c in columns[spec.features[i]]]
                else:  # a sequence: its pooled columns of the embedded batch
                    key = f"{prefix}seq.{spec.features[0]}".replace(".", "_")
                    self.register_buffer(f"{key}_cols", torch.tensor(columns[spec.features[0]]), persistent=False)
                    plan.append(("sequence", spec.name, 0, key, False))
                    w_rows += columns[spec.features[0]]
            for spec in inputs:
                if spec.context == (prefix == "context.") and spec.kind == "dense":
                    plan.append(("dense", spec.name, 0, "", True))
                    w_rows += [c for n in spec.features for c in columns[n]]
            side = "context" if prefix else "candidate"
            self.register_buffer(f"{side}_w_rows", torch.tensor(w_rows, dtype=torch.long), persistent=False)
            self.sides[side] = plan

    def _embedded(self, side: str, x: Tensor | None) -> Tensor:
        """The side's embedded columns (``[B, C]`` for the candidates, ``[1, C]`` for the context),
        in the order of ``<side>_w_rows``."""
        parts = []
        for kind, name, d, key, whole in self.sides[side]:
            value = self.given[name]
            if kind == "sparse":
                ids = value if whole else value.index_select(1, getattr(self, f"{key}_pos"))
                ids = ids + getattr(self, f"{key}_off")
                table = self.embedding.tables[str(d)].weight
                parts.append(table.index_select(0, ids.reshape(-1)).view(ids.shape[0], -1))
            elif kind == "sequence":
                assert x is not None  # computed by forward when a sequence is read
                rows = x if side == "candidate" else x[:1]
                parts.append(rows.index_select(1, getattr(self, f"{key}_cols")))
            else:
                parts.append(value)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, batch: TensorTable, x: Tensor | None, weight: Tensor, bias: Tensor) -> Tensor:
        """``x @ weight + bias`` for ``x`` the embedded ``batch`` (``[B, D]``; None when the caller has not
        computed it: it is then computed only if a sequence's pooled columns are read)."""
        if x is None and any(kind == "sequence" for plan in self.sides.values() for kind, *_ in plan):
            x = self.embedding(batch)[:, 0]
        once = bias + self._embedded("context", x) @ weight.index_select(0, self.context_w_rows)  # [1, K]
        return torch.addmm(once, self._embedded("candidate", x), weight.index_select(0, self.candidate_w_rows))


class EncodedInputModel(nn.Module):
    """``forward(*inputs)`` in :func:`graph_inputs` order -> the outputs of :func:`output_names`
    (``[B]`` each): per-task logits, per-task scores (calibrated when ``calibrators`` is given and
    active), the scores before calibration, the fused score when ``fusion`` is given.

    Rebuilds the :class:`TensorTable` batch the model reads (context columns broadcast to the batch and
    put back at their layout columns) and applies ``model.predict``.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        context_features: Sequence[str] = (),
        calibrators: Calibrators | None = None,
        fusion: FusionSpec | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        layout: FeatureLayout = model.layout
        self.inputs = graph_inputs(layout, context_features)
        self.calibrators = calibrators if calibrators is not None and calibrators.active else None
        self.fusion = fusion
        if self.calibrators is not None and self.calibrators.task_names != layout.task_names:
            raise MtrecError(
                f"calibration: fitted for tasks {self.calibrators.task_names}, the model has {layout.task_names}"
            )
        if fusion is not None and fusion.task_names != layout.task_names:
            raise MtrecError(f"fusion: the spec's tasks {fusion.task_names} are not the model's {layout.task_names}")
        self.output_names = output_names(layout, self.calibrators is not None, fusion is not None)
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
        # with context inputs, a first layer on the embedded batch (Embedded.linear) takes the context once
        self.splits: list[_ContextFirstLayer] = []
        if any(i.context for i in self.inputs):
            from mtrec.nn.embedding import FeatureEmbedding

            for module in model.modules():
                if isinstance(module, FeatureEmbedding) and module.copies == 1:
                    self.splits.append(_ContextFirstLayer(module, layout, self.inputs))
        self.split_layers = nn.ModuleList(self.splits)  # registered: traced as the wrapper's submodules

    @contextlib.contextmanager
    def _context_once(self, given: dict[str, Tensor]):
        """While the model runs on ``given``: every embedding's first layer takes the context once."""
        try:
            for split in self.splits:
                split.given = given
                # the bound __call__, not the module: assigned as is, it would become the embedding's submodule
                split.embedding.first_layer_override = split.__call__
            yield
        finally:
            for split in self.splits:
                split.embedding.first_layer_override = None
                split.given = {}

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
        with self._context_once(given):
            out = self.model(batch)
        raw = self.model.predict(out)
        outputs = list(out.logits.unbind(1))
        if self.calibrators is None:
            scores = raw
            outputs += scores.unbind(1)
        else:
            scores = self.calibrators.apply_torch(raw)  # float64 inside, float32 out, as the numpy path
            outputs += [*scores.unbind(1), *raw.unbind(1)]
        if self.fusion is not None:
            outputs.append(apply_fusion_torch(scores.double(), self.fusion))  # as apply_fusion: float64
        return tuple(outputs)


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
    """Largest differences between the exported artefact and PyTorch, per task, over every checked batch;
    for a graph with a calibrator or a fusion spec, also between those outputs and the numpy path."""

    max_abs: dict[str, float]  # logits
    max_rel: dict[str, float]  # logits and scores, relative to max(1, |PyTorch value|)
    max_abs_score: dict[str, float]
    binary: dict[str, bool]
    batch_sizes: list[int]
    calibration: str | None = None  # the included calibrator's method
    max_abs_calibrated: dict[str, float] = field(default_factory=dict)  # score.<task> vs numpy on raw.<task>
    max_rel_fused: float | None = None  # score vs apply_fusion of score.<task>, relative to |numpy value|

    def worst(self, task: str) -> float:
        """What the tolerance applies to: absolute on a binary task's logits and probabilities,
        relative on a regression task's outputs (its score is in the label's units)."""
        return max(self.max_abs[task], self.max_abs_score[task]) if self.binary[task] else self.max_rel[task]

    def summary(self) -> str:
        diffs = ", ".join(f"{t} {self.worst(t):.2g}" for t in self.max_abs)
        text = f"parity with PyTorch on batches of {self.batch_sizes} rows, max difference per task: {diffs}"
        if self.calibration is not None:
            cal = ", ".join(f"{t} {d:.2g}" for t, d in self.max_abs_calibrated.items())
            text += f"; calibrated ({self.calibration}) scores against numpy: {cal}"
        if self.max_rel_fused is not None:
            text += f"; fused score against numpy: max relative difference {self.max_rel_fused:.2g}"
        return text


def _fail(model: MultiTaskModel, fmt: str, what: str, sizes: list[int]) -> MtrecError:
    return MtrecError(
        f"model '{model.model_name()}' exported to {fmt}: parity check failed on {what} (batch sizes {sizes}); nothing written"
    )


def _check(
    model: MultiTaskModel, fmt: str, run_graph, wrapper: EncodedInputModel, rows: TensorTable, sizes: Sequence[int]
) -> ParityReport:
    """Run the exported graph (``run_graph(inputs) -> {output name: array}``) on ``rows`` split into
    ``sizes`` and compare with PyTorch (logits, model scores) and with the numpy calibrator and fusion
    (on the graph's own inputs to them); raise :class:`MtrecError` when an output is off by more than
    the tolerance."""
    tasks = model.layout.task_names
    binary = [t.type == "binary" for t in model.layout.tasks]
    calibrators, spec = wrapper.calibrators, wrapper.fusion
    report = ParityReport(
        {t: 0.0 for t in tasks}, {t: 0.0 for t in tasks}, {t: 0.0 for t in tasks}, dict(zip(tasks, binary)), []
    )
    if calibrators is not None:
        report.calibration = calibrators.method
        report.max_abs_calibrated = {t: 0.0 for t in tasks}
    if spec is not None:
        report.max_rel_fused = 0.0
    raw_name = "raw" if calibrators is not None else "score"
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
            logit = np.asarray(got[f"logit.{name}"], dtype=np.float64).reshape(-1)
            score = np.asarray(got[f"{raw_name}.{name}"], dtype=np.float64).reshape(-1)
            if logit.shape != (len(table),):
                raise MtrecError(
                    f"model '{model.model_name()}' exported to {fmt}: output 'logit.{name}' has shape {logit.shape} "
                    f"for a batch of {len(table)} rows; the batch dimension is not dynamic"
                )
            diff = np.abs(logit - ref_logits[:, t])
            report.max_abs[name] = max(report.max_abs[name], float(diff.max(initial=0.0)))
            sdiff = np.abs(score - ref_scores[:, t])
            report.max_abs_score[name] = max(report.max_abs_score[name], float(sdiff.max(initial=0.0)))
            rel = np.maximum(
                diff / np.maximum(1.0, np.abs(ref_logits[:, t])), sdiff / np.maximum(1.0, np.abs(ref_scores[:, t]))
            )
            report.max_rel[name] = max(report.max_rel[name], float(rel.max(initial=0.0)))
            if (~np.isfinite(logit) & np.isfinite(ref_logits[:, t])).any():
                raise MtrecError(
                    f"model '{model.model_name()}' exported to {fmt}: parity check failed on task '{name}': "
                    f"non-finite logits where PyTorch's are finite; nothing written"
                )
        scores = np.stack([np.asarray(got[f"score.{n}"]).reshape(-1) for n in tasks], axis=1).astype(np.float32)
        if calibrators is not None:  # the numpy calibrator on the graph's own raw scores
            raw = np.stack([np.asarray(got[f"raw.{n}"]).reshape(-1) for n in tasks], axis=1).astype(np.float32)
            want = calibrators.apply(raw).astype(np.float64)
            for t, name in enumerate(tasks):
                d = np.abs(scores[:, t].astype(np.float64) - want[:, t])
                d = np.where(np.isnan(d), np.where(np.isnan(want[:, t]) & np.isnan(scores[:, t]), 0.0, np.inf), d)
                if not binary[t]:
                    d = d / np.maximum(1.0, np.abs(want[:, t]))
                report.max_abs_calibrated[name] = max(report.max_abs_calibrated[name], float(d.max(initial=0.0)))
        if spec is not None:  # the numpy fusion on the graph's own (calibrated) scores
            fused = np.asarray(got[FUSED_OUTPUT], dtype=np.float64).reshape(-1)
            want = apply_fusion(scores, spec)
            d = np.abs(fused - want) / np.maximum(np.abs(want), 1e-300)
            d = np.where(fused == want, 0.0, d)  # equal infinities, both zero
            d = np.where(np.isnan(d), np.inf, d)
            report.max_rel_fused = max(report.max_rel_fused or 0.0, float(d.max(initial=0.0)))
        report.batch_sizes.append(len(table))
    for t, name in enumerate(tasks):
        worst = report.worst(name)
        if not worst <= TOLERANCE:
            kind = "absolute" if binary[t] else "relative"
            raise _fail(
                model,
                fmt,
                f"task '{name}': max {kind} difference {worst:.3g} from PyTorch exceeds {TOLERANCE:g}",
                report.batch_sizes,
            )
        if calibrators is not None and not report.max_abs_calibrated[name] <= TOLERANCE:
            raise _fail(
                model,
                fmt,
                f"the calibrated score of task '{name}' ({calibrators.method}): max difference "
                f"{report.max_abs_calibrated[name]:.3g} from the numpy calibrator exceeds {TOLERANCE:g}",
                report.batch_sizes,
            )
    if spec is not None and not (report.max_rel_fused or 0.0) <= TOLERANCE:
        raise _fail(
            model,
            fmt,
            f"the fused score ({spec.formula}): max relative difference {report.max_rel_fused:.3g} "
            f"from the numpy fusion exceeds {TOLERANCE:g}",
            report.batch_sizes,
        )
    return report


# ---- export ----------------------------------------------------------------------------------------


def _operator_of(err: BaseException) -> str:
    match = re.search(r"\b((?:aten|prim|onnx|quantized)::[A-Za-z0-9_.]+)", str(err))
    return match.group(1) if match else type(err).__name__


def _export_failure(model: MultiTaskModel, fmt: str, err: BaseException) -> MtrecError:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return MtrecError(
        f"model '{model.model_name()}' cannot be exported to {fmt}: operator '{_operator_of(err)}' ({first})"
    )


def _description(model: MultiTaskModel, wrapper: EncodedInputModel, extra: dict | None) -> dict:
    return {
        "mtrec_version": __version__,
        "graph_version": GRAPH_VERSION,
        "model": model.model_name(),
        "tasks": [{"name": t.name, "type": t.type} for t in model.layout.tasks],
        "inputs": [
            {"name": i.name, "kind": i.kind, "features": list(i.features), "context": i.context} for i in wrapper.inputs
        ],
        "columns": {  # the layout's columns, so a consumer can build the inputs from full encoded arrays
            "sparse": [f.name for f in model.layout.sparse],
            "dense": list(model.layout.dense),
            "sequences": [q.name for q in model.layout.sequences],
        },
        "outputs": wrapper.output_names,
        "calibration": (
            {"method": wrapper.calibrators.method, "sha256": calibration_digest(wrapper.calibrators)}
            if wrapper.calibrators is not None
            else None
        ),
        "fusion": (
            {"formula": wrapper.fusion.formula, "sha256": fusion_digest(wrapper.fusion)}
            if wrapper.fusion is not None
            else None
        ),
        **(extra or {}),
    }


def ort_session(
    model_bytes_or_path: bytes | str | Path,
    threads: int | None = None,
    spin: bool = True,
    stop_after_run: bool = False,
    initializers: Mapping[str, Any] | None = None,
):
    """An ONNX Runtime CPU session (``threads``: intra-op threads, default torch's setting). ``spin``: its
    threads spin between operators (ONNX Runtime's default: lowest latency on quiet cores); off, they sleep
    at once, which keeps latency steady beside other busy processes (BENCHMARKS.md: p50 1.95x slower beside
    a busy loop with spinning, 1.01x without, but 16% slower on quiet cores). ``stop_after_run``: spinning
    threads sleep as soon as a ``run`` returns (``session.force_spinning_stop``) instead of spinning on for
    the next one (ONNX Runtime spins up to milliseconds), leaving the cores to other work between runs.
    ``initializers``: ``{name: OrtValue}`` the session reads in place of the graph's own weights (see
    :func:`shared_initializers`); the caller keeps them alive as long as the session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the optimiser's notes are noise here
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif stop_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    source = str(model_bytes_or_path) if isinstance(model_bytes_or_path, Path) else model_bytes_or_path
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def shared_initializers(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The graph's weights as numpy arrays and as ONNX Runtime values over the same memory: sessions given
    the values (:func:`ort_session`) read those arrays instead of each keeping its own copy, so a second
    session of a graph costs its prepacked matrices and buffers, not a second set of embedding tables."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in graph.initializer}  # owned, writable, aligned
    return arrays, {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}


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

    names = wrapper.output_names
    dynamic = {i.name: {0: "batch"} for i in wrapper.inputs if not i.context} | {n: {0: "batch"} for n in names}
    _register_symbolics()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_stderr():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tuple(example.values()),
                buf,  # type: ignore[arg-type]  # a file object is accepted (torch's annotation says paths only)
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


def _to_torchscript(
    model: MultiTaskModel, wrapper: EncodedInputModel, example: dict[str, Tensor], description: dict
) -> bytes:
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
    metadata: dict | None = None,
    sizes: Sequence[int] | None = None,
    calibrators: Calibrators | None = None,
    fusion: FusionSpec | None = None,
) -> ParityReport:
    """Export ``model`` (put in eval mode) to ``path`` in ``fmt`` after checking parity on ``rows``.

    ``rows`` are encoded rows (use :func:`with_unknown_ids` to include unknown ids); ``sizes`` the
    batch sizes checked (default :func:`parity_sizes`). ``calibrators`` (when active) and ``fusion``
    go into the graph (see the module docstring; the spec must be fitted on the scores those
    calibrators give). Writes nothing when the export or the check fails (:class:`MtrecError` naming
    the model and the operator or the difference).
    """
    if fmt not in FORMATS:
        raise MtrecError(f"--format: unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if len(rows) == 0:
        raise MtrecError(f"model '{model.model_name()}': no rows to check the export against")
    model.eval()
    wrapper = EncodedInputModel(model, context_features, calibrators, fusion).eval()
    description = _description(model, wrapper, metadata)
    example = wrapper.feed(rows.slice(0, min(len(rows), 37)))
    sizes = list(sizes) if sizes is not None else parity_sizes(len(rows))
    outputs = wrapper.output_names
    if fmt == "onnx":
        data = _to_onnx(model, wrapper, example, description)
        session = ort_session(data)

        def run_graph(inputs: dict[str, Tensor]) -> dict[str, np.ndarray]:
            return dict(zip(outputs, session.run(outputs, {k: v.numpy() for k, v in inputs.items()})))
    else:
        data = _to_torchscript(model, wrapper, example, description)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still supported
            loaded = torch.jit.load(io.BytesIO(data))

        def run_graph(inputs: dict[str, Tensor]) -> dict[str, np.ndarray]:
            with torch.no_grad():
                return dict(zip(outputs, [o.numpy() for o in loaded(*inputs.values())]))

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


def parity_rows(run: Path, loaded: LoadedRun, limit: int = PARITY_ROWS) -> TensorTable:
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


def default_export_path(run: Path, fmt: str, context_features: Sequence[str] = ()) -> Path:
    """Where ``mtrec export`` writes by default: ``model.onnx`` / ``model.torchscript.pt`` in the run,
    or ``model.context.onnx`` / ``model.context.torchscript.pt`` for a graph with context inputs."""
    if context_features:
        return run / (CONTEXT_ONNX_FILE if fmt == "onnx" else CONTEXT_TORCHSCRIPT_FILE)
    return run / (ONNX_FILE if fmt == "onnx" else TORCHSCRIPT_FILE)


def export_run(
    run: Path,
    fmt: str,
    out: Path | None = None,
    context_features: Sequence[str] = (),
    fallback_rows: TensorTable | None = None,
    calibration: bool | None = None,
    fusion: None | bool | Path = None,
) -> tuple[Path, ParityReport]:
    """Export a run directory's model (default file: :func:`default_export_path`).

    ``calibration``: include the run's calibrator (``None``: when the run has ``calibration.json``;
    ``False``: leave it out, an error when the run has none). ``fusion``: ``True`` includes the run's
    ``fusion.yaml``, a path that spec (checked against the run's tasks and calibrator), ``None`` none.
    The parity check runs on the run's validation rows; when the run's data can no longer be read,
    on ``fallback_rows`` (encoded with the run's encoders, e.g. the rows about to be scored) if given.
    """
    from mtrec.fusion.spec import FUSION_FILE, fusion_for_run
    from mtrec.train.run import load_run

    if fmt not in FORMATS:
        raise MtrecError(f"--format: unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    loaded = load_run(run)
    layout = loaded.model.layout
    out = out if out is not None else default_export_path(run, fmt, context_features)
    graph_inputs(layout, context_features)  # a bad feature name fails before any data is read
    calibrators = Calibrators.load(run)
    if calibration is False and not calibrators.active:
        raise MtrecError(f"--no-calibration: {run} has no calibration.json; there is no calibrator to leave out")
    if calibration is True and not calibrators.active:
        raise MtrecError(f"--calibration: {run} has no calibration.json; run mtrec calibrate first")
    included = calibrators if calibration is not False and calibrators.active else None
    spec = None
    if fusion is not None and fusion is not False:
        source = None if fusion is True else Path(fusion)
        spec = fusion_for_run(run, layout, calibrators.method, source)  # checked against the run's tasks and calibrator
        if spec is None:
            raise MtrecError(
                f"--fusion: {run} has no {FUSION_FILE}; run mtrec fuse, or give a spec file (--fusion FILE)"
            )
        if spec.calibration is not None and included is None:
            raise MtrecError(
                f"--fusion {source or run / FUSION_FILE}: fitted on scores calibrated with {spec.calibration}; "
                f"it cannot go into a graph exported with --no-calibration"
            )
    try:
        rows = parity_rows(run, loaded)
    except MtrecError:
        if fallback_rows is None or len(fallback_rows) == 0:
            raise
        rows = with_unknown_ids(fallback_rows.slice(0, PARITY_ROWS))
    metadata = {"run": str(run.resolve()), "weights_sha256": weights_digest(run)}
    report = export_model(loaded.model, fmt, out, rows, context_features, metadata, calibrators=included, fusion=spec)
    return out, report


# ---- ONNX Runtime inference --------------------------------------------------------------------------


class OnnxScorer:
    """Scores encoded rows with an exported ONNX graph through ONNX Runtime.

    Two ways in: :meth:`outputs` / :meth:`scores` score a :class:`TensorTable` in chunks (a graph
    without context inputs: batch scoring); :meth:`feed` + :meth:`run` (or :meth:`model_scores`) score
    one request given as full encoded arrays, ``sparse`` ``[B, F]`` and ``dense`` ``[B, D]`` in layout
    order and ``sequences`` ``[B, L]`` or ``[1, L]``: candidate inputs take their columns from every
    row, context inputs (batch 1) from the first row, so the caller must give the context features
    the same value on every row (or batch 1 for a sequence).
    """

    def __init__(self, path: Path, threads: int | None = None, spin: SpinMode = "on") -> None:
        if spin not in SPIN_MODES:
            raise ValueError(f"spin: '{spin}' is not one of {', '.join(SPIN_MODES)}")
        self.path = Path(path)
        # spin="auto": a second session of the same graph whose threads sleep once a run returns, for a run
        # with no other request waiting (run(..., alone=True)); with requests queued, the first one's
        # threads keep spinning from one run to the next (see the service's module docstring). The two
        # read one copy of the weights (``shared_weights``: name -> the array both sessions read).
        self.shared_weights: dict[str, np.ndarray] = {}
        values: dict[str, Any] = {}
        if spin == "auto":
            self.shared_weights, values = shared_initializers(self.path)
        self._values = values  # alive as long as the sessions reading them
        self.session = ort_session(self.path, threads, spin != "off", initializers=values)
        self.alone_session = (
            ort_session(self.path, threads, True, stop_after_run=True, initializers=values) if spin == "auto" else None
        )
        self.runs = {"alone": 0, "queued": 0}  # runs per session of spin="auto" (tests, diagnosis)
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise MtrecError(f"{path}: not an ONNX file exported by mtrec (no '{METADATA_KEY}' metadata)")
        self.description = json.loads(meta)
        self.tasks = [t["name"] for t in self.description["tasks"]]
        self.inputs = [
            GraphInput(i["name"], i["kind"], tuple(i["features"]), i["context"]) for i in self.description["inputs"]
        ]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.calibration: dict | None = self.description.get("calibration")  # {"method", "sha256"} or None
        self.fusion: dict | None = self.description.get("fusion")  # {"formula", "sha256"} or None
        self.context_features = frozenset(f for i in self.inputs if i.context for f in i.features)
        columns = self.description.get("columns")
        if columns is None and not self.has_context:  # an older graph: one input per kind, every column in order
            columns = {k: list(next((i.features for i in self.inputs if i.kind == k), ())) for k in ("sparse", "dense")}
        self._select: dict[str, np.ndarray | None] | None = None
        if columns is not None:
            self._select = {}
            for spec in self.inputs:
                if spec.kind == "sequence":
                    continue
                names = columns[spec.kind]
                idx = np.array([names.index(n) for n in spec.features], dtype=np.int64)
                self._select[spec.name] = (
                    None if len(idx) == len(names) and (idx == np.arange(len(names))).all() else idx
                )

    @property
    def has_context(self) -> bool:
        return any(i.context for i in self.inputs)

    @property
    def model_score_outputs(self) -> list[str]:
        """The outputs holding the model's own scores (before any calibrator the graph includes)."""
        prefix = "raw" if self.calibration is not None else "score"
        return [f"{prefix}.{t}" for t in self.tasks]

    def feed(self, sparse: np.ndarray, dense: np.ndarray, sequences: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch of full encoded arrays (see the class docstring)."""
        if self._select is None:
            raise MtrecError(f"{self.path}: the graph's metadata has no column list; export it again with this mtrec")
        n = sparse.shape[0]
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.kind == "sequence":
                value = sequences[spec.features[0]]
                if spec.context:
                    value = value[:1]
                elif value.shape[0] != n:  # a [1, L] context sequence read by a candidate input
                    value = np.broadcast_to(value, (n, value.shape[1]))
            else:
                source = sparse if spec.kind == "sparse" else dense
                idx = self._select[spec.name]
                value = source if idx is None else source[:, idx]
                if spec.context:
                    value = value[:1]
            out[spec.name] = np.ascontiguousarray(value)
        return out

    def run(
        self, feed: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None, alone: bool = False
    ) -> dict[str, np.ndarray]:
        """``{output: array}`` of the graph on ``feed`` (default: every output); a context input must be batch 1.
        ``alone``: no other request waits for this graph (with ``spin="auto"``, its threads then sleep
        once the run returns)."""
        for spec in self.inputs:
            if spec.context and feed[spec.name].shape[0] != 1:
                raise MtrecError(
                    f"{self.path}: context input '{spec.name}' takes one row, got {feed[spec.name].shape[0]}"
                )
        names = list(outputs) if outputs is not None else self.output_names
        session = self.session
        if self.alone_session is not None:
            if alone:
                session = self.alone_session
            self.runs["alone" if alone else "queued"] += 1
        return dict(zip(names, session.run(names, dict(feed))))

    def model_scores(
        self, sparse: np.ndarray, dense: np.ndarray, sequences: Mapping[str, np.ndarray], alone: bool = False
    ) -> np.ndarray:
        """``[B, T]`` float32: the model's scores (before any calibrator in the graph) of one batch."""
        out = self.run(self.feed(sparse, dense, sequences), self.model_score_outputs, alone)
        return np.stack(list(out.values()), axis=1).astype(np.float32, copy=False)

    def outputs(self, table: TensorTable, names: Sequence[str], batch_size: int = 16384) -> dict[str, np.ndarray]:
        """The ``names`` outputs for every row of ``table`` (scored in chunks); no context inputs."""
        if self.has_context:
            raise MtrecError("this ONNX graph takes batch-1 context inputs; batch scoring needs one without")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for start in range(0, len(table), batch_size):
            end = start + batch_size
            sequences = {k: v[start:end].numpy() for k, v in table.sequences.items()}
            got = self.run(self.feed(table.sparse[start:end].numpy(), table.dense[start:end].numpy(), sequences), names)
            for k in names:
                parts[k].append(got[k])
        return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}

    def scores(self, table: TensorTable, batch_size: int = 16384) -> np.ndarray:
        """``[N, T]`` ``score.<task>`` outputs of every row of ``table`` (calibrated when the graph
        includes a calibrator: see :attr:`calibration`); no context inputs."""
        names = [f"score.{t}" for t in self.tasks]
        out = self.outputs(table, names, batch_size)
        return (
            np.stack([out[k] for k in names], axis=1).astype(np.float32)
            if len(table)
            else np.zeros((0, len(self.tasks)), np.float32)
        )


def _graph_meta(path: Path) -> dict:
    """The ``mtrec`` metadata of an ONNX file ({} when unreadable)."""
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props.get(METADATA_KEY, "{}"))
    except Exception:
        return {}


def run_onnx(run: Path, fallback_rows: TensorTable | None = None) -> Path:
    """The run's ONNX file for batch scoring (``model.onnx``), exported (with its parity check, see
    :func:`export_run` for ``fallback_rows``; with the run's calibrator when it has one) when absent,
    stale (other weights, or an older :data:`GRAPH_VERSION`) or exported with context inputs."""
    path = run / ONNX_FILE
    if path.is_file():
        meta = _graph_meta(path)
        fresh = meta.get("weights_sha256") == weights_digest(run) and meta.get("graph_version", 1) >= GRAPH_VERSION
        if fresh and not any(i.get("context") for i in meta.get("inputs", [])):
            return path
    export_run(run, "onnx", path, fallback_rows=fallback_rows)
    return path


def run_context_onnx(run: Path) -> Path | None:
    """The run's graph with context inputs (``model.context.onnx``, written by ``mtrec export
    --context-features``), or None when the run has none. A stale one (other weights, exported before
    the column list was recorded, or of an older :data:`GRAPH_VERSION`) is exported again with the same
    context features."""
    path = run / CONTEXT_ONNX_FILE
    if not path.is_file():
        return None
    meta = _graph_meta(path)
    features = [f for i in meta.get("inputs", []) if i.get("context") for f in i.get("features", [])]
    if not features:
        return None
    stale = meta.get("weights_sha256") != weights_digest(run) or meta.get("graph_version", 1) < GRAPH_VERSION
    if stale or "columns" not in meta:
        export_run(run, "onnx", path, context_features=features)
    return path


def predict_onnx(
    run: Path,
    table: TensorTable,
    calibrators: Calibrators | None = None,
    fusion: FusionSpec | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores of ``table`` (encoded with the run's encoders) through ONNX Runtime: ``[N, T]`` scores
    calibrated with ``calibrators`` (default: the run's), and the fused score ``[N]`` under ``fusion``
    (None without a spec). What the graph includes is taken from it when it is the same calibrator
    (by digest) and the same spec; anything else is applied here, on the graph's uncalibrated scores,
    so nothing is applied twice."""
    calibrators = calibrators if calibrators is not None else Calibrators.load(run)
    scorer = OnnxScorer(run_onnx(run, fallback_rows=table))
    graph_cal = scorer.calibration
    if graph_cal is None:
        same_cal = not calibrators.active
    else:
        same_cal = calibrators.active and graph_cal.get("sha256") == calibration_digest(calibrators)
    names = [f"score.{t}" for t in scorer.tasks] if same_cal else scorer.model_score_outputs
    use_fused = (
        fusion is not None
        and same_cal
        and scorer.fusion is not None
        and scorer.fusion.get("sha256") == fusion_digest(fusion)
    )
    out = scorer.outputs(table, names + ([FUSED_OUTPUT] if use_fused else []))
    scores = (
        np.stack([out[k] for k in names], axis=1).astype(np.float32)
        if len(table)
        else np.zeros((0, len(names)), np.float32)
    )
    if not (same_cal and graph_cal is not None):  # the graph gave the model's own scores
        scores = calibrators.apply(scores)
    fused: np.ndarray | None
    if use_fused:
        fused = out[FUSED_OUTPUT].astype(np.float64)
    else:
        fused = apply_fusion(scores, fusion) if fusion is not None else None
    return scores, fused
