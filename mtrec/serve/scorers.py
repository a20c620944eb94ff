"""Backends that turn an encoded request into per-task scores: PyTorch, or ONNX Runtime.

A :class:`Scorer` takes an :class:`~mtrec.serve.encoding.EncodedRequest` (every sparse and dense
column already ``[B, ...]``, a context sequence ``[1, L]``) and returns the model's raw ``[B, T]``
scores (before calibration and fusion, which the service applies the same way for every backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from mtrec.data.tables import TensorTable
from mtrec.models.base import MultiTaskModel
from mtrec.serve.encoding import EncodedRequest

BACKENDS = ("torch", "onnx")


class Scorer(Protocol):
    """What the service needs of a backend."""

    backend: str

    def score(self, batch: EncodedRequest) -> np.ndarray:
        """Raw ``[B, T]`` scores (float32) of the request's candidates."""
        ...


class TorchScorer:
    """One forward pass of the PyTorch model per request; a context sequence stays ``[1, L]`` and is
    broadcast to the batch as a stride-0 view (``expand``), never copied per candidate."""

    backend = "torch"

    def __init__(self, model: MultiTaskModel) -> None:
        self.model = model.eval()
        self.num_tasks = model.num_tasks

    @torch.inference_mode()
    def score(self, batch: EncodedRequest) -> np.ndarray:
        n = batch.size
        table = TensorTable(
            sparse=torch.from_numpy(batch.sparse),
            dense=torch.from_numpy(batch.dense),
            labels=torch.zeros((n, self.num_tasks)),  # read for the batch size only
            sequences={k: torch.from_numpy(v).expand(n, -1) for k, v in batch.sequences.items()},
        )
        return self.model.predict(self.model(table)).numpy()


class OnnxRuntimeScorer:
    """ONNX Runtime on the run's ``model.onnx`` (exported, with its parity check, on first use by
    :func:`mtrec.serve.export.run_onnx`). The graph takes full batches, so a context sequence is
    broadcast to the batch here (ONNX Runtime reads contiguous arrays)."""

    backend = "onnx"

    def __init__(self, run: Path, threads: Optional[int] = None) -> None:
        from mtrec.serve.export import OnnxScorer, run_onnx

        self._inner = OnnxScorer(run_onnx(run), threads=threads)
        self._outputs = [f"score.{t}" for t in self._inner.tasks]

    def score(self, batch: EncodedRequest) -> np.ndarray:
        feed = {}
        for spec in self._inner.inputs:
            if spec.kind == "sequence":
                value = batch.sequences[spec.features[0]]
                feed[spec.name] = np.ascontiguousarray(np.broadcast_to(value, (batch.size, value.shape[1])))
            else:
                feed[spec.name] = batch.sparse if spec.kind == "sparse" else batch.dense
        return np.stack(self._inner.session.run(self._outputs, feed), axis=1).astype(np.float32, copy=False)


def build_scorer(backend: str, run: Path, model: MultiTaskModel, threads: Optional[int] = None) -> Scorer:
    """The scorer of ``backend`` (``torch`` or ``onnx``) for a loaded run."""
    if backend == "onnx":
        return OnnxRuntimeScorer(run, threads)
    return TorchScorer(model)
