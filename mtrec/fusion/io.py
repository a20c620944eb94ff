"""Files and predictions of a run directory used by calibration and fusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtrec.data.tables import FeatureLayout


@dataclass
class SplitPredictions:
    """A split's model scores ``[N, T]``, labels ``[N, T]`` and user index ``[N]`` (None without a
    user column)."""

    scores: np.ndarray
    labels: np.ndarray
    user: np.ndarray | None
    layout: FeatureLayout

    def inside(self, t: int) -> np.ndarray:
        """Rows where task ``t`` is observed: every row, or its space's positives."""
        task = self.layout.tasks[t]
        if task.space is None:
            return np.ones(len(self.labels), dtype=bool)
        return self.labels[:, self.layout.task_index(task.space)] > 0.5


def run_predictions(
    run: Path, splits: Sequence[str] = ("valid", "test"), calibrated: bool = True
) -> dict[str, SplitPredictions]:
    """Score the run's own ``splits`` (read from the run's schema, encoded with its encoders);
    with ``calibrated`` the run's calibrator (if any) is applied, as ``mtrec predict`` does."""
    from mtrec.data.ingest import encode, load_splits
    from mtrec.data.store import table_from_arrays
    from mtrec.fusion.calibration import Calibrators
    from mtrec.train.run import load_run

    loaded = load_run(run)
    calibrators = Calibrators.load(run) if calibrated else None
    out: dict[str, SplitPredictions] = {}
    for split, (frame, path) in load_splits(loaded.schema).items():
        if split not in splits:
            continue
        table = table_from_arrays(encode(frame, loaded.schema, loaded.encoders, path))
        scores = loaded.model.predict_table(table).astype(np.float64)
        if calibrators is not None:
            scores = calibrators.apply(scores)
        user = table.user.numpy() if table.user is not None else None
        out[split] = SplitPredictions(scores, table.labels.numpy().astype(np.float64), user, loaded.model.layout)
    return out
