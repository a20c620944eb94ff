"""Gate utilisation: which experts each task's gate uses, on the validation split.

For every gated model (``ModelOutput.gates``: name -> ``[B, E]`` weights; zeros where a gate may not
look), gates are grouped into panels of one level or one pool (``level0/income`` -> panel ``level0``,
row ``income``; MetaHeac's ``income/experts`` -> panel ``experts``, row ``income``). Per panel:

- ``mean``: ``[rows, E]`` mean gate weight of each row's gate over each expert (the heatmap);
- ``entropy``: per row, the mean over samples of the gate's entropy divided by ``log`` of the number
  of experts it may use (1: uniform mixing, 0: one expert takes everything);
- ``collapsed``: experts no gate uses (mean weight below ``unused`` in every row);
- ``monopolised``: experts several gates may use of which one row takes at least ``monopoly`` of the
  total usage (a shared expert one task has taken over).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch

from mtrec.data.tables import TensorTable

UNUSED = 0.01  # mean gate weight below which an expert counts as unused by a gate
MONOPOLY = 0.9  # share of a shared expert's total usage above which one gate has taken it over
POOLS = ("level", "route")  # name prefixes that are panels (PLE/AdaTT levels, SNR routings)


class GateUsage(TypedDict):
    """One gate's usage over a table."""

    mean: np.ndarray  # [E] mean weight per expert
    entropy: float  # mean entropy of the weights, normalised by log(allowed experts)
    allowed: np.ndarray  # [E] bool: experts the gate may mix


def panel_and_row(name: str) -> tuple[str, str]:
    if "/" not in name:
        return "", name
    a, b = name.split("/", 1)
    return (a, b) if a.startswith(POOLS) else (b, a)


@torch.no_grad()
def gate_means(model: torch.nn.Module, table: TensorTable, batch_size: int = 8192) -> dict[str, GateUsage]:
    """Per gate name: ``mean`` ``[E]`` weight, ``entropy`` (normalised mean), ``allowed`` ``[E]`` bool."""
    model.eval()
    sums: dict[str, np.ndarray] = {}
    ent: dict[str, float] = {}
    seen: dict[str, np.ndarray] = {}
    n = 0
    for start in range(0, len(table), batch_size):
        batch = table.slice(start, start + batch_size)
        gates = model(batch, return_gates=True).gates
        for name, w in gates.items():
            w = w.double()
            sums[name] = sums.get(name, 0) + w.sum(0).numpy()
            seen[name] = seen.get(name, np.zeros(w.shape[1], bool)) | (w > 0).any(0).numpy()
            ent[name] = ent.get(name, 0.0) + float(-(w * torch.log(w.clamp_min(1e-12))).sum())
        n += len(batch)
    out: dict[str, GateUsage] = {}
    for name in sums:
        allowed = seen[name]
        k = int(allowed.sum())
        out[name] = {
            "mean": sums[name] / max(n, 1),
            "entropy": (ent[name] / max(n, 1)) / np.log(k) if k > 1 else 0.0,
            "allowed": allowed,
        }
    return out


def gate_utilisation(
    model: torch.nn.Module, table: TensorTable, unused: float = UNUSED, monopoly: float = MONOPOLY
) -> dict[str, dict]:
    """Panels of gate usage (see the module docstring); empty for a model without gates."""
    per_gate = gate_means(model, table)
    panels: dict[str, dict] = {}
    for name, g in per_gate.items():
        panel, row = panel_and_row(name)
        p = panels.setdefault(panel, {"rows": [], "mean": [], "entropy": {}, "allowed": []})
        p["rows"].append(row)
        p["mean"].append(g["mean"])
        p["allowed"].append(g["allowed"])
        p["entropy"][row] = float(g["entropy"])
    out = {}
    for panel, p in panels.items():
        if len({len(m) for m in p["mean"]}) != 1:
            continue  # gates of different widths are no heatmap (not produced by mtrec's models)
        mean = np.stack(p["mean"])  # [rows, E]
        allowed = np.stack(p["allowed"])  # [rows, E]
        collapsed = [int(e) for e in range(mean.shape[1]) if (mean[:, e] < unused).all()]
        monopolised = []
        for e in range(mean.shape[1]):
            total = mean[:, e].sum()
            if allowed[:, e].sum() >= 2 and total > 0 and e not in collapsed:
                top = int(mean[:, e].argmax())
                share = float(mean[top, e] / total)
                if share >= monopoly:
                    monopolised.append({"expert": e, "by": p["rows"][top], "share": share})
        out[panel] = {
            "rows": p["rows"],
            "mean": mean.round(6).tolist(),
            "entropy": p["entropy"],
            "collapsed": collapsed,
            "monopolised": monopolised,
        }
    return out


def findings(util: dict[str, dict]) -> list[str]:
    """Plain-language lines about the panels."""
    lines = []
    for panel, p in util.items():
        where = f"gates {panel}: " if panel else "gates: "
        ent = ", ".join(f"{r} {v:.2f}" for r, v in p["entropy"].items())
        lines.append(f"{where}normalised entropy {ent} (1 = even mixing, 0 = one expert)")
        if p["collapsed"]:
            lines.append(f"{where}expert(s) {', '.join(map(str, p['collapsed']))} unused by every gate (collapsed)")
        for m in p["monopolised"]:
            lines.append(f"{where}expert {m['expert']} is shared but {m['by']} takes {m['share']:.0%} of its use")
    return lines
