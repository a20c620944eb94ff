"""Backends that turn an encoded request into per-task scores: PyTorch, or ONNX Runtime.

A :class:`Scorer` takes an :class:`~mtrec.serve.encoding.EncodedRequest` (every sparse and dense
column already ``[B, ...]``, a context sequence ``[1, L]``) and returns the model's raw ``[B, T]``
scores (before calibration and fusion, which the service applies the same way for every backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from mtrec.data.tables import TensorTable
from mtrec.models.base import MultiTaskModel
from mtrec.serve import SpinMode
from mtrec.serve.encoding import EncodedRequest

if TYPE_CHECKING:
    from mtrec.serve.export import OnnxScorer

BACKENDS = ("torch", "onnx")


class Scorer(Protocol):
    """What the service needs of a backend."""

    backend: str

    def score(self, batch: EncodedRequest, alone: bool = False) -> np.ndarray:
        """Raw ``[B, T]`` scores (float32) of the request's candidates; ``alone``: no other request waits
        (a backend may then free its threads once done)."""
        ...


class TorchScorer:
    """One forward pass of the PyTorch model per request; a context sequence stays ``[1, L]`` and is
    broadcast to the batch as a stride-0 view (``expand``), never copied per candidate."""

    backend = "torch"

    def __init__(self, model: MultiTaskModel) -> None:
        self.model = model.eval()
        self.num_tasks = model.num_tasks

    @torch.inference_mode()
    def score(self, batch: EncodedRequest, alone: bool = False) -> np.ndarray:
        # alone: nothing to do, torch's OpenMP threads already sleep ~10 us after a region (mtrec.threads)
        n = batch.size
        table = TensorTable(
            sparse=torch.from_numpy(batch.sparse),
            dense=torch.from_numpy(batch.dense),
            labels=torch.zeros((n, self.num_tasks)),  # read for the batch size only
            sequences={k: torch.from_numpy(v).expand(n, -1) for k, v in batch.sequences.items()},
        )
        return self.model.predict(self.model(table)).numpy()


class OnnxRuntimeScorer:
    """ONNX Runtime on the run's graphs (:mod:`mtrec.serve.export`): ``model.context.onnx`` when the run
    has one (``mtrec export --context-features ...``) and the request gives every one of its context
    features in ``context`` (so they are the same for every candidate): its context inputs then take
    one row, broadcast inside the graph; otherwise ``model.onnx`` (exported with its parity check on
    first use), fed full batches (a context sequence broadcast here). Either way the model's own
    scores come back (``raw.<task>`` of a graph that includes a calibrator): the service calibrates
    and fuses them, the same way for every backend.

    ``spin`` (:data:`mtrec.serve.SPIN_MODES`): how ONNX Runtime's threads wait. ``auto`` spins while
    requests queue and lets the threads sleep after a request that was alone; ``on`` always spins (ONNX
    Runtime's default), ``off`` never does."""

    backend = "onnx"

    def __init__(self, run: Path, threads: int | None = None, spin: SpinMode = "auto") -> None:
        from mtrec.serve.export import OnnxScorer, run_context_onnx, run_onnx

        self.batch_graph = OnnxScorer(run_onnx(run), threads=threads, spin=spin)
        context = run_context_onnx(run)
        self.context_graph = OnnxScorer(context, threads=threads, spin=spin) if context is not None else None

    def graph_for(self, batch: EncodedRequest) -> OnnxScorer:
        """The graph that scores ``batch``: the context graph when the request gives all its context features once."""
        graph = self.context_graph
        if graph is not None and graph.context_features <= batch.context:
            return graph
        return self.batch_graph

    def score(self, batch: EncodedRequest, alone: bool = False) -> np.ndarray:
        return self.graph_for(batch).model_scores(batch.sparse, batch.dense, batch.sequences, alone)


def build_scorer(
    backend: str, run: Path, model: MultiTaskModel, threads: int | None = None, ort_spin: SpinMode = "auto"
) -> Scorer:
    """The scorer of ``backend`` (``torch`` or ``onnx``) for a loaded run (``ort_spin``: see
    :func:`mtrec.serve.export.ort_session`)."""
    if backend == "onnx":
        return OnnxRuntimeScorer(run, threads, ort_spin)
    return TorchScorer(model)
