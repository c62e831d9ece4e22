"""Tables and plots for sensitivity, budget plans and prune potential. They render; no computing."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from prunec.eval.budget import Plan
from prunec.eval.potential import PotentialReport
from prunec.eval.sensitivity import SensitivityReport
from prunec.report.format import human, metric_label



def sensitivity_table(report: SensitivityReport) -> Table:
    """One row per group, by depth: size, drop (points) at each ratio, MACs saved at the largest ratio."""
    slices = max((len(x.drops or {}) for g in report.groups for x in g.trials), default=0)
    worst = f", the worst of {slices} gated slices (clean, corrupted)" if slices > 1 else ""
    t = Table(title=f"sensitivity: drop in {metric_label(report.metric)} points when one group is pruned "
                    f"(baseline {report.baseline:.2f}{worst})", title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("group", no_wrap=True)
    t.add_column("depth", justify="right")
    t.add_column("size", justify="right")
    for r in report.ratios:
        t.add_column(f"@{r:g}", justify="right")
    t.add_column(f"MACs saved @{max(report.ratios):g}", justify="right")
    for g in sorted(report.groups, key=lambda g: (g.group.depth, g.group.id)):
        if g.group.frozen:
            t.add_row(g.group.id, str(g.group.depth), str(g.group.size),
                      *(["frozen"] + [""] * (len(report.ratios) - 1)), g.group.frozen[:40])
            continue
        drops = [g.drop_at(r) for r in report.ratios]
        last = max(g.trials, key=lambda x: x.ratio) if g.trials else None
        t.add_row(g.group.id, str(g.group.depth), str(g.group.size),
                  *["-" if d is None else f"{d:+.2f}" for d in drops],
                  human(last.macs) if last else "-")
    return t


def plan_table(plan: Plan, report: SensitivityReport) -> Group:
    """Per-group ratios of a budget plan, then a line with its cost and predicted drop (a line,
    not a caption: a caption wraps at the table's width)."""
    if plan.budget.kind == "latency":  # plan costs are microseconds, measured
        cost = [f"{v / 1000:.3g} ms" for v in (plan.original, plan.achieved, plan.target)]
        what = "measured latency"
    else:
        cost = [human(v) for v in (plan.original, plan.achieved, plan.target)]
        what = plan.budget.kind
    t = Table(title=f"plan for {plan.budget}", title_justify="left", box=box.SIMPLE_HEAD)
    for c in ("group", "depth", "size", "ratio"):
        t.add_column(c, justify="left" if c == "group" else "right", no_wrap=True)
    for g in sorted(report.groups, key=lambda g: (g.group.depth, g.group.id)):
        if g.group.frozen:
            continue
        t.add_row(g.group.id, str(g.group.depth), str(g.group.size), f"{plan.groups.get(g.group.id, 0.0):.2f}")
    return Group(t, Text(f"{what} {cost[0]} → {cost[1]} (target {cost[2]}); predicted drop "
                         f"{plan.predicted_drop:.2f} points"))


def potential_table(report: PotentialReport) -> Table:
    """Rows: ratios (with MACs kept); columns: clean and each corruption; last row: prune potential."""
    what = "uniform channel ratio" if report.mode == "uniform" else "MAC fraction removed by a sensitivity plan"
    t = Table(title=f"prune potential: {metric_label(report.metric)} per {what} (δ = {report.delta:g} points)",
              title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("ratio" if report.mode == "uniform" else "MACs removed", justify="right", no_wrap=True)
    t.add_column("MACs kept", justify="right", no_wrap=True)
    for v in report.variants:
        t.add_column(v, justify="right", no_wrap=True)
    t.add_row("0 (orig)", "100%", *[f"{report.baseline[v]:.2f}" for v in report.variants])
    for i, r in enumerate(report.ratios):
        cells = []
        for v in report.variants:
            val = report.values[v][i]
            ok = val >= report.baseline[v] - report.delta - 1e-9
            cells.append(f"{val:.2f}" if ok else f"[red]{val:.2f}[/red]")
        kept = report.macs[i] / report.original_macs if report.original_macs else float("nan")
        t.add_row(f"{r:g}", f"{kept:.0%}", *cells)
    t.add_section()
    t.add_row("potential", "", *[f"[bold]{report.potential[v]:g}[/bold]" for v in report.variants])
    return t


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        from prunec.errors import OptionError

        raise OptionError("--plot needs matplotlib (pip install matplotlib)") from None
    return plt


def _save(fig, path: str | Path) -> None:
    import io

    from prunec.report.files import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def plot_sensitivity(report: SensitivityReport, path: str | Path) -> None:
    """Heat map: groups (by depth) x ratios, colour = drop in points."""
    import numpy as np

    plt = _pyplot()
    groups = sorted((g for g in report.groups if not g.group.frozen), key=lambda g: (g.group.depth, g.group.id))
    grid = np.array([[np.nan if g.drop_at(r) is None else g.drop_at(r) for r in report.ratios] for g in groups])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(report.ratios), 1.2 + 0.32 * max(1, len(groups))))
    im = ax.imshow(grid if grid.size else np.zeros((1, len(report.ratios))), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(report.ratios)), [f"{r:g}" for r in report.ratios])
    ax.set_yticks(range(len(groups)), [f"{g.group.id} (d{g.group.depth})" for g in groups], fontsize=7)
    ax.set_xlabel("prune ratio of the group")
    fig.colorbar(im, ax=ax, label=f"drop ({metric_label(report.metric)} points)")
    ax.set_title("per-group sensitivity")
    _save(fig, path)
    plt.close(fig)


def plot_potential(report: PotentialReport, path: str | Path) -> None:
    """Metric vs ratio, one line per input variant, with each variant's tolerance band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [0.0] + report.ratios
    for v in report.variants:
        line, = ax.plot(xs, [report.baseline[v]] + report.values[v], marker="o", ms=3,
                        label=f"{v} (potential {report.potential[v]:g})")
        ax.axhline(report.baseline[v] - report.delta, color=line.get_color(), lw=0.5, ls=":")
    ax.set_xlabel("uniform channel prune ratio" if report.mode == "uniform"
                  else "fraction of MACs removed (sensitivity plan)")
    ax.set_ylabel(metric_label(report.metric))
    ax.set_title(f"prune potential (δ = {report.delta:g} points)")
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
