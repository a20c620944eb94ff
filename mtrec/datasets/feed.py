"""A generated short-video feed log: the multi-objective ranking case Census lacks (a user column,
sparse engagement signals, a watch-time regression), for demos, fusion search and the service.

Users have a taste vector and an age, items a topic vector, an appeal, a quality and a duration.
Per impression (user, item):

- ``click``: ``sigmoid(1.2 appeal + 1.5 taste . topic - 0.5)``;
- ``like`` (sparse, about 5% of impressions): ``sigmoid(2 quality + 1.0 taste . topic - 3.5)``;
- ``finish``: ``sigmoid(1.5 quality - 0.04 (duration - 30) + 0.5 taste . topic - 0.3 appeal)``: appealing
  thumbnails on long, poor videos are clicked and abandoned, so click and finish partly disagree;
- ``watch_time`` (seconds, regression): ``duration * sigmoid(quality + taste . topic) + noise``.

The user side (``user``, ``age``) and the item side (``item``, ``category``, ``duration``) are separate
columns, as a ranking request sends them. Rows are written once per argument set into the cache
(``$MTREC_CACHE/datasets``) with a schema beside them: ``--dataset feed --dataset-args rows=60000,seed=0``.
No number measured on this data says anything about a real feed; it is a test bed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from mtrec.datasets.cache import write_once


class FeedArgs(BaseModel):
    """``--dataset-args`` of ``feed``."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(60000, ge=100)
    users: int = Field(2000, ge=2)
    items: int = Field(1000, ge=2)
    topics: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    watch_time: bool = True  # include the regression task


def generate(args: FeedArgs) -> pl.DataFrame:
    rng = np.random.default_rng(args.seed)
    taste = rng.normal(0, 1, (args.users, args.topics)) / np.sqrt(args.topics)
    age = rng.integers(16, 70, args.users)
    topic = rng.normal(0, 1, (args.items, args.topics))
    appeal, quality = rng.normal(0, 1, args.items), rng.normal(0, 1, args.items)
    duration = rng.gamma(3.0, 10.0, args.items).round(1)
    category = topic.argmax(1)
    user, item = rng.integers(0, args.users, args.rows), rng.integers(0, args.items, args.rows)
    match = (taste[user] * topic[item]).sum(1)

    def draw(logit: np.ndarray) -> np.ndarray:
        return (rng.random(args.rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)

    columns = {
        "user": [f"u{u}" for u in user],
        "age": age[user],
        "item": [f"i{i}" for i in item],
        "category": [f"c{c}" for c in category[item]],
        "duration": duration[item],
        "click": draw(1.2 * appeal[item] + 1.5 * match - 0.5),
        "like": draw(2.0 * quality[item] + 1.0 * match - 3.5),
        "finish": draw(1.5 * quality[item] - 0.04 * (duration[item] - 30) + 0.5 * match - 0.3 * appeal[item]),
    }
    if args.watch_time:
        seen = duration[item] / (1.0 + np.exp(-(quality[item] + match)))
        columns["watch_time"] = np.clip(seen + rng.normal(0, 2.0, args.rows), 0, None).round(2)
    return pl.DataFrame(columns)


def schema_path(args: FeedArgs, cache: Path) -> Path:
    """Write the rows (Parquet) and their schema once per argument set; return the schema's path."""
    tasks = [{"name": t, "type": "binary", "label": t} for t in ("click", "like", "finish")]
    if args.watch_time:
        tasks.append({"name": "watch_time", "type": "regression", "label": "watch_time"})
    spec = {
        "name": f"feed_n{args.rows}_s{args.seed}",
        "source": {"train": "rows.parquet"},
        "format": {"type": "parquet"},
        "split": {"valid": 0.15, "test": 0.15},
        "features": [
            {"name": "user", "type": "sparse", "embed_dim": 8},
            {"name": "age", "type": "dense"},
            {"name": "item", "type": "sparse", "embed_dim": 8},
            {"name": "category", "type": "sparse", "embed_dim": 4},
            {"name": "duration", "type": "dense", "log": True},
        ],
        "tasks": tasks,
        "user": "user",
    }
    return write_once(cache, "feed", args, lambda: generate(args), spec, "generated short-video feed")
