"""Rich tables for `prunec run` and `prunec inspect`. They render result objects; no computing."""

from __future__ import annotations

from rich.table import Table

from prunec.graph.costs import CostReport
from prunec.passes.manager import RunReport
from prunec.report.format import arrow, human


def run_table(report: RunReport) -> Table:
    """One row per pass plus the total: nodes, params, MACs, verification, time."""
    t = Table(title="prunec run", title_justify="left")
    for col in ("pass", "nodes", "params", "MACs", "verified", "time", "notes"):
        t.add_column(col, justify="right" if col in ("time",) else "left")
    for p in report.passes:
        v = p.verification
        if v is None:
            verified = "not verified"
        elif p.exact:
            verified = f"exact (rel err {v.max_rel:.1e})"
        else:
            verified = f"lossy (rel dev {v.max_rel:.2g}, cos {v.min_cosine:.4f})"
        notes = []
        if not p.result.changed:
            notes.append("no change")
        if p.result.skipped:
            notes.append(f"{len(p.result.skipped)} skipped")
        t.add_row(p.name, f"{p.before.nodes} → {p.after.nodes}", arrow(p.before.params, p.after.params),
                  arrow(p.before.macs, p.after.macs), verified, f"{p.seconds:.2f}s", ", ".join(notes))
    if report.before and report.after:
        t.add_section()
        t.add_row("total", f"{report.before.nodes} → {report.after.nodes}",
                  arrow(report.before.params, report.after.params),
                  arrow(report.before.macs, report.after.macs), "", "", "")
    return t


def skipped_table(report: RunReport, limit: int = 20) -> Table | None:
    """What each pass left alone and why (the first `limit` rows)."""
    rows = [(p.name, s.what, s.why) for p in report.passes for s in p.result.skipped]
    if not rows:
        return None
    t = Table(title=f"skipped ({len(rows)})", title_justify="left")
    for col in ("pass", "what", "why"):
        t.add_column(col)
    for r in rows[:limit]:
        t.add_row(*r)
    if len(rows) > limit:
        t.add_row("…", f"{len(rows) - limit} more in --report", "")
    return t


def costs_table(costs: CostReport, limit: int | None = None) -> Table:
    """Per-layer params and MACs, in graph order, with the share of total MACs."""
    t = Table(title="layers", title_justify="left")
    for col in ("layer", "op", "weight", "output", "params", "MACs", "% MACs"):
        t.add_column(col, justify="right" if col in ("params", "MACs", "% MACs") else "left")
    layers = costs.layers if limit is None else costs.layers[:limit]
    for layer in layers:
        share = f"{100 * layer.macs / costs.macs:.1f}" if costs.macs and layer.macs else ""
        t.add_row(layer.name, layer.op_type, _shape(layer.weight_shape), _shape(layer.output_shape),
                  human(layer.params), human(layer.macs), share)
    t.add_section()
    t.add_row("total", "", "", "", human(costs.params), human(costs.macs), "")
    return t


def _shape(s) -> str:
    return "x".join(str(d) for d in s) if s else ""


def verdict_line(output: str, command: str, *, forced: bool = False) -> str:
    """The closing line of `prunec run`, repeating the command: PASSED, or FORCED when --force
    wrote a model whose accuracy gate failed (never PASSED then)."""
    from rich.markup import escape

    if forced:
        return (f"[yellow]FORCED[/yellow]: wrote {escape(output)} although the accuracy gate failed "
                f"| prunec {escape(command)}")
    return f"[green]PASSED[/green]: wrote {escape(output)} | prunec {escape(command)}"
