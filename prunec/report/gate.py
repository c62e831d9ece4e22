"""Rich table and verdict line for a GateReport (prunec check, prunec run --data)."""

from __future__ import annotations

import math

from rich import box
from rich.table import Table

from prunec.eval.gate import GateReport
from prunec.report.format import metric_label

_STATUS = {"pass": "[green]pass[/green]", "fail": "[red]FAIL[/red]", "too few": "[yellow]too few[/yellow]",
           "near chance": "[yellow]near chance[/yellow]"}


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1f}"


def gate_table(report: GateReport) -> Table:
    """One row per slice: n, original, pruned, drop with its interval, agreement, limit, verdict."""
    metric = metric_label(report.metric)
    t = Table(title=f"accuracy gate ({metric} on output {report.output!r})", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    cols = ["slice", "n", "orig", "pruned", "drop", "95% CI",
            "agree" if report.fidelity == "agreement" else "cos", "limit", "pass"]
    if report.top_k > 1:
        cols[4:4] = [f"top{report.top_k} orig", f"top{report.top_k} pruned"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("slice", "pass") else "right", no_wrap=True)
    kind = None
    for s in report.slices:
        if kind is not None and s.kind != kind and s.kind in ("corruption", "class", "length", "user"):
            t.add_section()
        kind = s.kind
        row = [s.name, str(s.n), _pct(s.original.value), _pct(s.candidate.value),
               f"{s.drop.value:+.1f}", f"{s.drop.lo:.1f}..{s.drop.hi:.1f}",
               _pct(s.agreement.value) if s.agreement else "-",
               "-" if s.max_drop is None else f"{s.max_drop:g}",
               _STATUS[s.status]]
        if report.top_k > 1:
            row[4:4] = [_pct(s.topk[0].value), _pct(s.topk[1].value)] if s.topk else ["-", "-"]
        t.add_row(*row)
    return t


def gate_reasons(report: GateReport) -> list[str]:
    """One line per failed slice saying which threshold it broke."""
    return [f"{s.name}: {'; '.join(s.reasons)}" for s in report.failed]


def gate_verdict(report: GateReport) -> str:
    """One line: PASSED/FAILED, how many slices, and the slices too small to count as evidence."""
    few = report.too_few
    tail = (f"; {len(few)} slice(s) under {report.thresholds.min_samples} samples are not evidence: "
            + ", ".join(s.name for s in few[:6]) + (" ..." if len(few) > 6 else "")) if few else ""
    near = report.near_chance
    if near:
        tail += f"; {len(near)} near-chance slice(s) not gated"
    if report.passed:
        return f"[green]PASSED[/green]: {len(report.slices) - len(near)} slice(s) within thresholds{tail}"
    if not report.failed:
        return f"[red]FAILED[/red]: {report.problems[0]}"
    return (f"[red]FAILED[/red]: {len(report.failed)} of {len(report.slices)} slice(s) broke a threshold: "
            + ", ".join(s.name for s in report.failed[:6]) + (" ..." if len(report.failed) > 6 else "") + tail)
