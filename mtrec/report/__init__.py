"""Reports of `mtrec bench` grids: one self-contained HTML file and a Markdown version, with
matplotlib figures (tables with paired tests and verdicts, Pareto front, training curves, gate
heatmaps, timing, and the relatedness probes when ``relate.json`` is there)."""

from mtrec.report.build import build_document, write_report

__all__ = ["build_document", "write_report"]
