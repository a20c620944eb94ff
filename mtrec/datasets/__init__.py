"""Embedded data sets, selectable by name (``mtrec train --dataset census``), some with arguments
(``--dataset synthetic --dataset-args correlation=0.5,rows=20000,seed=0``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from mtrec.errors import MtrecError

_HERE = Path(__file__).resolve().parent
# name -> what it is (the listing `mtrec` prints and errors name)
DATASETS: dict[str, str] = {
    "census": "Census-Income (KDD): income > 50K and never married, 300k rows, shipped with mtrec",
    "synthetic": "the MMoE paper's two regression tasks with a set correlation (generated; --dataset-args)",
    "feed": "a short-video feed: users, items, click / like / finish / watch_time (generated; --dataset-args)",
}


def dataset_schema_path(name: str, args: dict | None = None) -> Path:
    """Path of the schema file of an embedded data set (generated first for ``synthetic``)."""
    if name not in DATASETS:
        raise MtrecError(f"unknown dataset '{name}'; choose one of: {', '.join(sorted(DATASETS))}")
    if name == "census":
        if args:
            raise MtrecError("dataset 'census' takes no --dataset-args")
        return _HERE / "census" / "census.yaml"
    from mtrec.data.store import cache_root
    from mtrec.datasets import feed, synthetic

    module = synthetic if name == "synthetic" else feed
    model = synthetic.SyntheticArgs if name == "synthetic" else feed.FeedArgs
    try:
        parsed = model.model_validate(args or {})
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        valid = ", ".join(f"{k}={v.default}" for k, v in model.model_fields.items())
        raise MtrecError(f"--dataset-args of '{name}': {details}; its arguments: {valid}") from None
    return module.schema_path(parsed, cache_root())
