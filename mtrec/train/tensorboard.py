"""TensorBoard logs of a training run: per-task losses and the balancer's weights over steps.

``history.json`` keeps per-epoch means; this keeps the curves. Every ``every`` steps it writes
``train/loss/<task>`` and the balancer's ``stats()`` (``balancer/weight/<task>``, and for
gradient methods ``balancer/cos/<a>_vs_<b>``, the cosine between two tasks' gradients; TensorBoard
tags allow no ``~``); after every epoch ``valid/<task>/<metric>`` and ``valid/score``. View with
``tensorboard --logdir``.

Event files are written with tensorboardX (no TensorFlow, no TensorBoard server needed to
write); :func:`read_scalars` reads them back without TensorBoard, for tests and plots.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtrec.train.trainer import Callback

if TYPE_CHECKING:  # pragma: no cover
    from mtrec.train.trainer import Trainer


class TensorBoardLogger(Callback):
    """Writes scalars to an event file under ``log_dir`` (created if missing)."""

    def __init__(self, log_dir: Path, every: int = 10) -> None:
        from tensorboardX import SummaryWriter

        self.every = max(1, every)
        self.writer = SummaryWriter(logdir=str(log_dir), flush_secs=30)

    def on_batch_end(self, trainer: Trainer, step: int, losses: torch.Tensor) -> None:
        if step % self.every:
            return
        for name, value in zip(trainer.model.task_names, losses.tolist()):
            self.writer.add_scalar(f"train/loss/{name}", value, step)
        for key, value in trainer.step_stats.items():
            self.writer.add_scalar(f"balancer/{key.replace('~', '_vs_')}", float(value), step)

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict) -> None:
        for task, metrics in record["valid"].items():
            for metric, value in metrics.items():
                if value is not None:
                    self.writer.add_scalar(f"valid/{task}/{metric}", float(value), trainer.step)
        if record["score"] is not None:
            self.writer.add_scalar("valid/score", float(record["score"]), trainer.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from every event file under ``log_dir``.

    An event file is a sequence of records: an 8-byte little-endian length, a 4-byte CRC of it,
    the serialised ``Event`` protobuf, and a 4-byte CRC of that (CRCs are not checked here).
    """
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
