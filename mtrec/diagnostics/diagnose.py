"""`mtrec diagnose --run DIR`: what the conflict monitor and the gates say about one finished run.

No training: the monitor's per-epoch figures come from ``history.json``; gate usage is measured on the
run's validation split with its best weights. Everything goes to ``DIR/diagnostics.json`` (written
atomically) and a few plain-language lines.
"""

from __future__ import annotations

from pathlib import Path

from mtrec.data.ingest import encode, load_splits
from mtrec.data.store import table_from_arrays
from mtrec.diagnostics.gates import findings as gate_findings
from mtrec.diagnostics.gates import gate_utilisation
from mtrec.errors import MtrecError
from mtrec.files import read_json, write_json_atomic

ALIGNED_COS = 0.1  # mean cosine above which (with few conflicts) two tasks' gradients pull together
CONFLICT_SHARE = 0.5  # share of samples in conflict above which a pair is called conflicting
LEARNING = 0.9  # a task whose loss stays above this fraction of its first value is hardly learning


def monitor_summary(history: list[dict]) -> dict | None:
    """The monitor's samples over all epochs: per pair the sample-weighted mean cosine and conflict share
    and the last epoch's norm ratio; per task the last velocity. None when the run had no monitor."""
    epochs = [h["monitor"] for h in history if h.get("monitor", {}).get("samples")]
    if not epochs:
        return None
    samples = sum(e["samples"] for e in epochs)
    pairs = {}
    for name in epochs[-1]["pairs"]:
        rows = [(e["samples"], e["pairs"][name]) for e in epochs if e["pairs"][name]["cos_mean"] is not None]
        n = sum(k for k, _ in rows)
        pairs[name] = {
            "cos_mean": sum(k * r["cos_mean"] for k, r in rows) / n if n else None,
            "conflict_share": sum(k * r["conflict_share"] for k, r in rows) / n if n else None,
            "norm_ratio_last_epoch": epochs[-1]["pairs"][name]["norm_ratio"],
            "cos_by_epoch": [e["pairs"][name]["cos_mean"] for e in epochs],
        }
    tasks = {t: {"velocity": v["velocity"], "loss_last_epoch": v["loss"]} for t, v in epochs[-1]["tasks"].items()}
    return {"samples": samples, "every": epochs[-1].get("every"), "pairs": pairs, "tasks": tasks}


def monitor_findings(summary: dict | None) -> list[str]:
    if summary is None:
        return ["conflict monitor: this run was trained without it (--monitor-every 0)"]
    lines = []
    for name, p in summary["pairs"].items():
        if p["cos_mean"] is None:
            lines.append(f"{name}: no sample had both gradients")
            continue
        a, b = name.split("~")
        word = (
            "conflicting"
            if p["cos_mean"] < 0 or p["conflict_share"] > CONFLICT_SHARE
            else "aligned"
            if p["cos_mean"] > ALIGNED_COS
            else "nearly orthogonal"
        )
        ratio = p["norm_ratio_last_epoch"]
        lines.append(
            f"{name}: {word}: mean gradient cosine {p['cos_mean']:+.3f} on the shared layers over "
            f"{summary['samples']} samples, in conflict (cosine < 0) in {p['conflict_share']:.0%} of them; "
            + (f"|g_{a}| / |g_{b}| = {ratio:.2f} in the last epoch" if ratio is not None else "")
        )
    for task, v in summary["tasks"].items():
        vel = v["velocity"]
        if vel is None:
            continue
        state = "hardly learning" if vel > LEARNING else "learning"
        lines.append(f"{task}: loss at {vel:.2f} of its first sampled value ({state})")
    return lines


def diagnose_run(run: Path) -> dict:
    """Diagnostics of a finished run (see the module docstring); writes ``run/diagnostics.json``."""
    from mtrec.train.run import load_run

    loaded = load_run(run)
    history_path = run / "history.json"
    if not history_path.is_file():
        raise MtrecError(f"{run}: no history.json here; not a finished mtrec run")
    history = read_json(history_path, "history")
    monitor = monitor_summary(history)
    splits = load_splits(loaded.schema)
    if "valid" not in splits:
        raise MtrecError(f"{run}: the run's schema has no validation split to measure the gates on")
    frame, path = splits["valid"]
    table = table_from_arrays(encode(frame, loaded.schema, loaded.encoders, path))
    gates = gate_utilisation(loaded.model, table)
    lines = monitor_findings(monitor) + (gate_findings(gates) if gates else ["gates: this model has none"])
    out = {"model": loaded.config["model"], "monitor": monitor, "gates": gates, "findings": lines}
    write_json_atomic(run / "diagnostics.json", out)
    return out
