"""The synthetic two-task data of the MMoE paper (Ma et al., KDD 2018, section 3.2): the test bed
where the relatedness of the tasks is known because it is set.

Two orthogonal unit vectors ``u1, u2`` in ``R^d``, a scale ``c`` and a correlation ``p`` give the
tasks' weight vectors ``w1 = c u1`` and ``w2 = c (p u1 + sqrt(1 - p^2) u2)`` (so ``cos(w1, w2) = p``).
Each row draws ``x ~ N(0, I_d)`` and two regression labels

    y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps_k,   eps_k ~ N(0, noise^2),

with the same ``alpha_i, beta_i`` for both tasks, so the tasks differ only through ``w1, w2`` and the
label correlation grows with ``p`` (not equal to it: the sinusoids make the relation non-linear).

Settings: ``d = 100``, ``c = 1``, ``m = 10`` as in the paper; ``alpha_i, beta_i ~ N(0, 1)``; the paper
writes the noise as ``N(0, 0.01)``, read here as variance 0.01 (``noise = 0.1``, the standard
deviation). Everything (``u1, u2``, ``alpha``, ``beta``, the rows) comes from one generator seeded by
``seed``, so a seed is one data set. The rows are written once per set of arguments into the cache
(``$MTREC_CACHE/datasets``) with a schema beside them; ``mtrec ... --dataset synthetic
--dataset-args correlation=0.5,rows=20000,seed=0`` reads them like any schema.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from mtrec.datasets.cache import write_once


class SyntheticArgs(BaseModel):
    """``--dataset-args`` of ``synthetic``."""

    model_config = ConfigDict(extra="forbid")

    correlation: float = Field(0.5, ge=-1.0, le=1.0)  # p, the cosine of the tasks' weight vectors
    rows: int = Field(20000, ge=100)
    seed: int = Field(0, ge=0)
    dim: int = Field(100, ge=2)  # d
    sinusoids: int = Field(10, ge=0)  # m
    scale: float = Field(1.0, gt=0.0)  # c
    noise: float = Field(0.1, ge=0.0)  # standard deviation of eps_k
    valid: float = Field(0.1, gt=0.0, lt=0.5)
    test: float = Field(0.1, ge=0.0, lt=0.5)


def generate(args: SyntheticArgs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x`` ``[N, d]``, labels ``y`` ``[N, 2]`` and the weight vectors ``w`` ``[2, d]``."""
    rng = np.random.default_rng(args.seed)
    basis, _ = np.linalg.qr(rng.standard_normal((args.dim, 2)))  # two orthonormal columns
    u1, u2 = basis[:, 0], basis[:, 1]
    p = args.correlation
    w = args.scale * np.stack([u1, p * u1 + np.sqrt(1.0 - p * p) * u2])  # [2, d]
    alpha, beta = rng.standard_normal(args.sinusoids), rng.standard_normal(args.sinusoids)
    x = rng.standard_normal((args.rows, args.dim))
    z = x @ w.T  # [N, 2]
    y = z + np.sin(z[:, :, None] * alpha + beta).sum(-1) + args.noise * rng.standard_normal((args.rows, 2))
    return x.astype(np.float32), y, w


def schema_path(args: SyntheticArgs, cache: Path) -> Path:
    """Write the rows (Parquet) and their schema once per argument set; return the schema's path."""

    def rows() -> pl.DataFrame:
        x, y, _ = generate(args)
        return pl.DataFrame({f"x{i}": x[:, i] for i in range(args.dim)} | {"y1": y[:, 0], "y2": y[:, 1]})

    spec = {
        "name": f"synthetic_p{args.correlation:g}_n{args.rows}_s{args.seed}",
        "source": {"train": "rows.parquet"},
        "format": {"type": "parquet"},
        "split": {"valid": args.valid, "test": args.test},
        "features": [{"name": f"x{i}", "type": "dense"} for i in range(args.dim)],
        "tasks": [
            {"name": "y1", "type": "regression", "label": "y1"},
            {"name": "y2", "type": "regression", "label": "y2"},
        ],
    }
    return write_once(cache, "synthetic", args, rows, spec, "MMoE paper synthetic data")
