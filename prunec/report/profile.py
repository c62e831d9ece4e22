"""Rich tables for `prunec profile` and the profile lines of `prunec run`. Rendering only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from prunec.report.format import arrow, human, nbytes

if TYPE_CHECKING:  # report/ sits beside eval/: it renders these objects, it never builds them
    from prunec.eval.profile import CompareReport, ProfileReport


def _is_compare(report) -> bool:
    return hasattr(report, "speedups")


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _ci(lo: float, hi: float) -> str:
    return f"[{_ms(lo)}, {_ms(hi)}]"


def header(report: ProfileReport | CompareReport) -> str:
    """One line naming the machine, provider, threads and timing settings."""
    p = report.before if _is_compare(report) else report
    m, s = p.machine, p.settings
    budget = f"{s['runs']} runs" if s["runs"] else f"{s['seconds']:g} s"
    mode = ", interleaved ABBA" if s.get("interleaved") else ""
    runtime = getattr(p.target, "runtime", "ort")
    version = f"{runtime} {m[runtime]}" if runtime in m else f"onnxruntime {m['onnxruntime']}"
    spin = ", spinning off" if runtime == "ort" else ""
    return (f"{p.provider} on {m['cpu']} ({m['logical_cpus']} logical CPUs), threads "
            f"{p.threads or 'default'}, {version}, {m['date']}; "
            f"{budget} per batch after {s['warmup']} warm-up runs{mode}, "
            f"{s['gap_ms']:g} ms idle gap{spin}")


def latency_table(report: ProfileReport) -> Table:
    """Percentiles, the median's interval and throughput per batch size."""
    conf = int(round(report.latency[0].confidence * 100)) if report.latency else 95
    t = Table(title=f"latency (ms): {report.model}", title_justify="left")
    for col in ("batch", "runs", "p50", f"p50 {conf}% CI", "p90", "p99", "mean", "items/s"):
        t.add_column(col, justify="right")
    for s in report.latency:
        t.add_row(str(s.batch), str(s.runs), _ms(s.p50_ms), _ci(*s.median_ci_ms), _ms(s.p90_ms),
                  _ms(s.p99_ms), _ms(s.mean_ms), human(s.items_per_s))
    return t


def costs_table(before: ProfileReport, after: ProfileReport | None = None) -> Table:
    """Params, MACs per batch, weight and file bytes (before → after when comparing)."""
    t = Table(title="costs", title_justify="left")
    t.add_column("")
    t.add_column("value" if after is None else "before → after")
    rows = [("params", before.costs.params, after.costs.params if after else None, human)]
    for b, macs in before.costs.macs.items():
        rows.append((f"MACs (batch {b})", macs, after.costs.macs.get(b) if after else None, human))
    rows += [("weight bytes", before.costs.weight_bytes, after.costs.weight_bytes if after else None, nbytes),
             ("file bytes", before.costs.file_bytes, after.costs.file_bytes if after else None, nbytes)]
    for name, v0, v1, fmt in rows:
        if after is None:
            t.add_row(name, fmt(v0))
        elif fmt is human:
            t.add_row(name, arrow(v0, v1))
        else:
            t.add_row(name, f"{fmt(v0)} → {fmt(v1)}")
    return t


def compare_table(report: CompareReport) -> Table:
    """Per batch: p50 before/after, speedup with its interval, MAC speedup, realized share.

    The medians' own intervals and the throughputs are in the JSON (and `--json`'s schema).
    """
    conf = int(round(report.speedups[0].confidence * 100)) if report.speedups else 95
    pairs = ", ".join(str(sp.pairs) for sp in report.speedups)
    t = Table(title=f"speedup (p50 latency, {pairs} interleaved pairs): before = {report.before.model}, "
                    f"after = {report.after.model}", title_justify="left")
    for col in ("batch", "before ms", "after ms", "speedup", f"{conf}% CI", "MAC speedup", "realized"):
        t.add_column(col, justify="right")
    for sp in report.speedups:
        b, a = report.before.at(sp.batch), report.after.at(sp.batch)
        t.add_row(str(sp.batch), _ms(b.p50_ms), _ms(a.p50_ms), f"{sp.speedup:.2f}x",
                  f"{sp.ci[0]:.2f}-{sp.ci[1]:.2f}",
                  f"{sp.theoretical:.2f}x" if sp.theoretical else "?",
                  f"{100 * sp.realized:.0f}%" if sp.realized is not None else "?")
    return t


def ops_table(before: ProfileReport, after: ProfileReport | None = None, limit: int = 15) -> Table | None:
    """Kernel time per op type (median per run, from ORT's profiler), before vs after."""
    if before.ops is None:
        return None
    ob, oa = before.ops, after.ops if after else None
    t = Table(title=f"time by op type (ms per run, batch {ob.batch}, {ob.source}, optimized graph)",
              title_justify="left")
    t.add_column("op")
    if oa is None:
        for col in ("nodes", "ms", "% time"):
            t.add_column(col, justify="right")
        for op, ms in list(ob.by_op_ms.items())[:limit]:
            t.add_row(op, str(ob.op_counts[op]), _ms(ms), f"{100 * ms / ob.total_ms:.1f}" if ob.total_ms else "")
        t.add_section()
        t.add_row("total", "", _ms(ob.total_ms), "")
        return t
    for col in ("nodes before → after", "ms before", "ms after", "change"):
        t.add_column(col, justify="right")
    ops = list(dict.fromkeys(list(ob.by_op_ms) + list(oa.by_op_ms)))[:limit]
    for op in ops:
        v0, v1 = ob.by_op_ms.get(op, 0.0), oa.by_op_ms.get(op, 0.0)
        change = f"{(v1 - v0) / v0 * 100:+.0f}%" if v0 else "new"
        t.add_row(op, f"{ob.op_counts.get(op, 0)} → {oa.op_counts.get(op, 0)}", _ms(v0), _ms(v1), change)
    t.add_section()
    total = f"{(oa.total_ms - ob.total_ms) / ob.total_ms * 100:+.0f}%" if ob.total_ms else ""
    t.add_row("total", "", _ms(ob.total_ms), _ms(oa.total_ms), total)
    return t


def top_nodes_table(report: ProfileReport, title: str = "slowest nodes") -> Table | None:
    """The slowest nodes of the optimized graph, median kernel time per run."""
    if report.ops is None or not report.ops.top_nodes:
        return None
    t = Table(title=f"{title} ({report.model}, batch {report.ops.batch})", title_justify="left")
    # Runtimes that rename nodes (OpenVINO, TensorRT) get the ONNX names they kept, and the kernel.
    extra = any(n.kernel or (n.onnx_nodes and n.onnx_nodes != [n.name]) for n in report.ops.top_nodes)
    cols = ("node", "op", "provider", "ms", "% time") + (("kernel", "ONNX nodes") if extra else ())
    for col in cols:
        t.add_column(col, justify="right" if col in ("ms", "% time") else "left")
    for n in report.ops.top_nodes:
        share = f"{100 * n.ms / report.ops.total_ms:.1f}" if report.ops.total_ms else ""
        row = [n.name, n.op_type, n.provider.replace("ExecutionProvider", ""), _ms(n.ms), share]
        if extra:
            row += [n.kernel or "", ", ".join(n.onnx_nodes)]
        t.add_row(*row)
    if report.ops.sparse_layers is not None:
        t.caption = (f"sparse kernels: {', '.join(report.ops.sparse_layers)}" if report.ops.sparse_layers
                     else "sparse kernels: none (no layer ran a 2:4 sparse kernel)")
    return t


def memory_line(before: ProfileReport, after: ProfileReport | None = None) -> str | None:
    """Peak resident memory of a session (child process), before → after."""
    if before.memory is None:
        return None
    mb = before.memory
    head = f"peak RSS (child process, batch {mb.batch}): "
    text = f"{head}{nbytes(mb.peak_rss_bytes)}, session adds {nbytes(mb.session_bytes)}"
    if after is not None and after.memory is not None:
        ma = after.memory
        text = (f"{head}{nbytes(mb.peak_rss_bytes)} → {nbytes(ma.peak_rss_bytes)}; "
                f"session adds {nbytes(mb.session_bytes)} → {nbytes(ma.session_bytes)}")
    return text + (" (ORT's CPU arena size is not exposed by its Python API)" if mb.cpu_arena else "")


def speedup_line(report: CompareReport) -> str:
    """One line per batch for `prunec run`'s summary: measured speedup, interval, MAC prediction.

    When the whole interval is below 1 the rewritten model is slower, and the line says so.
    """
    parts = []
    slower = False
    for sp in report.speedups:
        b, a = report.before.at(sp.batch), report.after.at(sp.batch)
        text = (f"batch {sp.batch}: {_ms(b.p50_ms)} → {_ms(a.p50_ms)} ms, speedup {sp.speedup:.2f}x "
                f"[{sp.ci[0]:.2f}, {sp.ci[1]:.2f}]")
        if sp.theoretical:
            text += f" (MACs predict {sp.theoretical:.2f}x, realized {100 * sp.realized:.0f}%)"
        if sp.ci[1] < 1.0:
            text += " [yellow]SLOWER[/yellow]"
            slower = True
        parts.append(text)
    line = f"latency on {report.before.provider.replace('ExecutionProvider', '')}: " + "; ".join(parts)
    target = getattr(report.before, "target", None)
    rerun = f" --runtime {target.runtime}" if target is not None and target.runtime != "ort" else ""
    if slower:
        line += (f"\n[yellow]the rewritten model runs slower; see where the time goes with "
                 f"`prunec profile {escape(report.before.model)} --compare {escape(report.after.model)}{rerun}`"
                 "[/yellow]")
    return line


def render(console, report: ProfileReport | CompareReport) -> None:
    """Print every table for a profile or a comparison."""
    console.print(header(report))
    if not _is_compare(report):
        items = [costs_table(report), latency_table(report), ops_table(report), top_nodes_table(report),
                 memory_line(report)]
    else:
        b, a = report.before, report.after
        items = [costs_table(b, a), compare_table(report), ops_table(b, a),
                 top_nodes_table(b, "slowest nodes before"), top_nodes_table(a, "slowest nodes after"),
                 memory_line(b, a)]
    for item in items:
        if item is not None:
            console.print(item)
