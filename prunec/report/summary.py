"""Rich tables for `prunec run` and `prunec inspect`. They render result objects; no computing."""

from __future__ import annotations

import re
from collections import Counter

from rich.markup import escape
from rich.table import Table

from prunec.graph.costs import CostReport
from prunec.passes.manager import RunReport
from prunec.report.format import arrow, human


def _verified(p) -> str:
    """The verification cell of one pass: exact within what, or what proved a lossy pass."""
    v = p.verification
    if v is None:
        return "not verified"
    if p.exact:
        return f"exact ({v.max_rel:.1e})"
    if v.proof is not None:
        return f"= {v.proof.what} ({v.proof.max_rel:.1e})"
    if v.masks_proven is not None:
        return f"masks proven ({v.masks_proven})"
    return "lossy, NOT proven"


def _category(why: str) -> str:
    """A skip reason without its names and numbers, to count reasons of one kind together."""
    return re.sub(r"\s+", " ", re.sub(r"'[^']*'|\"[^\"]*\"|\b[\w./:@-]*\d[\w./:@-]*\b", "…", why)).strip()


def nothing_eligible(p) -> str | None:
    """Why a pass that changed nothing did so: its most common skip reason, with a count."""
    if p.result.changed:
        return None
    if not p.result.skipped:
        return "nothing to do"
    cats = Counter(_category(s.why) for s in p.result.skipped)
    cat, n = cats.most_common(1)[0]
    example = next(s.why for s in p.result.skipped if _category(s.why) == cat)
    return f"nothing eligible: {n} of {len(p.result.skipped)} skipped as {example!r}"


def run_table(report: RunReport) -> Table:
    """One row per pass plus the total: nodes, params, MACs, verification, time."""
    t = Table(title="prunec run", title_justify="left")
    for col in ("pass", "nodes", "params", "MACs", "verified", "time", "notes"):
        t.add_column(col, justify="right" if col in ("time",) else "left")
    for p in report.passes:
        notes = []
        if not p.result.changed:
            notes.append(f"no change: {nothing_eligible(p)}")
        else:
            if not p.exact and p.verification is not None:
                notes.append(f"vs before: cos {p.verification.min_cosine:.4g}, "
                             f"rel dev {p.verification.max_rel:.2g}")
            if p.result.skipped:
                notes.append(f"{len(p.result.skipped)} skipped")
        t.add_row(p.name, f"{p.before.nodes} → {p.after.nodes}", arrow(p.before.params, p.after.params),
                  arrow(p.before.macs, p.after.macs), _verified(p), f"{p.seconds:.2f}s", ", ".join(notes))
    if report.before and report.after:
        t.add_section()
        t.add_row("total", f"{report.before.nodes} → {report.after.nodes}",
                  arrow(report.before.params, report.after.params),
                  arrow(report.before.macs, report.after.macs), "", "", "")
    return t


def normalized_note(report: RunReport) -> str | None:
    """One line on the weights made initializers before the passes, if any."""
    if not report.normalized:
        return None
    where = {"constant_nodes": "Constant nodes", "identity": "behind Identity", "cast": "behind Cast"}
    parts = [f"{n} {where.get(k, k)}" for k, n in report.normalized.items()]
    return f"weights made initializers before the passes: {', '.join(parts)}"


def fidelity_table(report: RunReport) -> Table | None:
    """Per output: cosine and relative deviation of the result from the original (lossy runs)."""
    if not report.lossy or not report.final_deviation:
        return None
    t = Table(title=f"fidelity to the original, on {report.fidelity_on}", title_justify="left")
    for col in ("output", "cosine", "rel dev", "max abs"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for name, d in report.final_deviation.items():
        t.add_row(name, f"{d['cosine']:.4f}", f"{d['rel']:.3g}", f"{d['max_abs']:.3g}")
    return t


def _fidelity(report: RunReport) -> str:
    devs = list(report.final_deviation.values())
    cos = min((d["cosine"] for d in devs), default=1.0)
    rel = max((d["rel"] for d in devs), default=0.0)
    return f"fidelity cos {cos:.4g} / rel dev {rel:.2g} on {report.fidelity_on}"


def _checks(report: RunReport) -> list[str]:
    """The checks that ran, for the verdict line."""
    if not any(p.verification for p in report.passes):
        return []
    checks = ["checker", "shape inference", "interface", "ONNX Runtime"]
    if any(p.exact and p.verification for p in report.passes if p.result.changed):
        checks.append("exact outputs")
    for p in report.passes:
        v = p.verification
        if v is not None and v.proof is not None and f"{v.proof.what} proof" not in checks:
            checks.append(f"{v.proof.what} proof")
        if v is not None and v.masks_proven is not None and "weight masks" not in checks:
            checks.append("weight masks")
    return checks


def verdict(report: RunReport, output: str, command: str, *, gate=None) -> str:
    """The closing line of `prunec run` (rich markup): what was written and what that is worth.

    PASSED only when every check that ran passed and the outputs are either unchanged within the
    exact tolerance or were checked for accuracy (`gate`: the --data gate's report). A lossy
    result without an accuracy check says so (WROTE) and states its fidelity; FORCED when --force
    wrote a model that failed the accuracy or fidelity gate; UNCHANGED when no pass changed it."""
    output, command = escape(output), escape(command)
    checks = _checks(report)
    checked = f"checks: {', '.join(checks)}" if checks else "NOT verified"
    tail = f" | prunec {command}"
    failed = [what for what, bad in (("accuracy gate", gate is not None and not gate.passed),
                                     ("fidelity gate", bool(report.fidelity_forced))) if bad]
    if failed:  # only --force writes then, and the line says so first
        fid = f"lossy: {_fidelity(report)}; " if report.lossy else ""
        return (f"[yellow]FORCED[/yellow]: wrote {output} although the {' and the '.join(failed)} "
                f"failed ({fid}{checked}){tail}")
    if not report.changed:
        why = "; ".join(f"{p.name}: {nothing_eligible(p)}" for p in report.passes)
        return f"[yellow]UNCHANGED[/yellow]: wrote {output} (no pass changed the model; {why}){tail}"
    if not report.lossy:
        return f"[green]PASSED[/green]: wrote {output} (exact; {checked}){tail}"
    fid = _fidelity(report)
    if gate is None:
        return (f"[yellow]WROTE[/yellow] {output} (lossy: {fid}; accuracy NOT checked: pass --data; "
                f"{checked}){tail}")
    return f"[green]PASSED[/green]: wrote {output} (lossy: {fid}; accuracy gate passed; {checked}){tail}"


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


