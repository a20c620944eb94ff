"""One rank of a 2-process data-parallel run, for tests/test_distributed.py (not a test module).

``python -m tests.ddp_worker OUT SCHEMA`` with torchrun's variables set (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``): joins the gloo process group once, trains ``mmoe`` for one epoch with
every balancer of :data:`CASES` through :func:`mtrec.train.run.train_run` (no run directory), and saves
this rank's final weights and validation metrics to ``OUT/rank<RANK>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mtrec.schema import load_schema
from mtrec.train.options import TrainConfig
from mtrec.train.run import train_run

# name -> (balancer, options); the per-rank batch is half the reference run's batch
CASES = {
    "fixed": ("fixed", {}),
    "uw": ("uw", {}),
    "mgda": ("mgda", {}),
    "mgda_repr": ("mgda", {"level": "repr"}),
}
PER_RANK_BATCH = 256
MODEL_ARGS = {"num_experts": 2, "expert_hidden": [16], "tower_hidden": [8]}


def config(batch_size: int) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=batch_size, seed=3, monitor_every=0, progress=False)


def main() -> None:
    out, schema_path = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # once for every case (train_run leaves a group it did not create)
    schema = load_schema(schema_path)
    results = {}
    for name, (balancer, options) in CASES.items():
        result = train_run(
            schema,
            "mmoe",
            None,
            config(PER_RANK_BATCH),
            model_options=MODEL_ARGS,
            balancer_name=balancer,
            balancer_options=options,
            tensorboard=False,
        )
        results[name] = {"state": result.model.state_dict(), "valid": result.metrics["valid"]}
    torch.save(results, out / f"rank{os.environ['RANK']}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
