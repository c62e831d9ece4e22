"""`--plot out.png`: latency distributions per batch size, before and after. Rendering only.

matplotlib is optional (the `plot` extra); it is imported only when a plot is asked for.
"""

from __future__ import annotations

import io
import os

from prunec.errors import OptionError
from prunec.report.files import write_bytes_atomic


def check_plot_available() -> None:
    """Fail before any measuring if --plot was given but matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'prunec[plot]'") from None


def plot_latency(report, path: str | os.PathLike) -> None:
    """Histogram (log-spaced bins) of per-run latency at each batch size; one panel per batch."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    series = [(report.before, "before"), (report.after, "after")] if hasattr(report, "speedups") \
        else [(report, "latency")]
    batches = [s.batch for s in series[0][0].latency]
    fig, axes = plt.subplots(len(batches), 1, figsize=(7, 2.6 * len(batches)), squeeze=False)
    for ax, b in zip(axes[:, 0], batches):
        stats = [(p.at(b), name) for p, name in series]
        lo = min(min(s.samples_ms) for s, _ in stats)
        hi = max(max(s.samples_ms) for s, _ in stats)
        bins = np.geomspace(max(lo, 1e-3), max(hi, lo * 1.01, 1e-3 * 1.01), 60)
        for s, name in stats:
            ax.hist(s.samples_ms, bins=bins, alpha=0.55, label=f"{name}: p50 {s.p50_ms:.3g} ms (n={s.runs})")
            ax.axvline(s.p50_ms, linestyle="--", linewidth=1, color=ax.patches[-1].get_facecolor()[:3])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        title = f"batch {b}"
        if hasattr(report, "speedups"):
            sp = next(x for x in report.speedups if x.batch == b)
            title += f": speedup {sp.speedup:.2f}x [{sp.ci[0]:.2f}, {sp.ci[1]:.2f}]"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("latency per run (ms, log scale)")
        ax.set_ylabel("runs")
        ax.legend(fontsize=8)
    fig.suptitle(f"{series[0][0].provider}, threads {series[0][0].threads or 'default'}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
