"""`prunec profile`: latency, costs, op times and memory on the target runtime; and the
profile step at the end of `prunec run`."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import click
import onnx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from prunec.cli.options import (announce_fixed, batch_option, feed_option, input_shape_options, json_option,
                                model_argument, runtime_options)
from prunec.errors import OptionError
from prunec.eval.profile import CompareReport, compare_models, profile_model
from prunec.report.console import ProgressLines, console, stderr_is_terminal
from prunec.report.files import check_output_file, write_text_atomic
from prunec.runtime.runtimes import check_target
from prunec.runtime.target import Target


class _Bar:
    """A rich progress bar fed by the profiler's callback; it never redraws on its own, so no
    refresh thread competes with the runs being timed."""

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 console=console, transient=True, auto_refresh=False)
        self.task = self.progress.add_task("warm-up", total=1.0)

    def __call__(self, what: str, fraction: float) -> None:
        self.progress.update(self.task, description=what, completed=fraction)
        self.progress.refresh()

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()


@click.command("profile")
@model_argument
@click.option("--compare", "other", default=None, type=click.Path(path_type=str), metavar="OTHER.onnx",
              help="Second model (e.g. the pruned one): timed interleaved with MODEL; speedup = MODEL / OTHER.")
@runtime_options
@batch_option()
@input_shape_options
@feed_option
@click.option("--runs", type=int, default=None, help="Timed runs per model and batch size.")
@click.option("--seconds", type=float, default=None,
              help="Timing budget per batch size (both models together). Default 2 s unless --runs.")
@click.option("--warmup", type=int, default=5, show_default=True,
              help="Untimed runs before timing, per session and batch size.")
@click.option("--sessions", type=int, default=4, show_default=True,
              help="Freshly built sessions (pairs with --compare) the budget is split over; the "
                   "intervals include their spread.")
@click.option("--top", type=int, default=10, show_default=True, help="Slowest nodes to list.")
@click.option("--no-ops", is_flag=True,
              help="Skip the per-op breakdown (the runtime's profiler or performance counters).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement (child process).")
@json_option("Write the report as JSON here (schema: docs/profile-schema.md).")
@click.option("--samples", is_flag=True, help="Include every run's latency in the --json file.")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=str),
              help="Write latency histograms (before/after) to this PNG (needs matplotlib).")
def command(model: str, other: str | None, target: Target, batches: tuple[int, ...],
            input_shapes, feeds, runs: int | None, seconds: float | None, warmup: int, sessions: int,
            top: int, no_ops: bool,
            no_memory: bool, json_path: str | None, samples: bool, plot_path: str | None) -> None:
    """Measure MODEL on a runtime (ONNX Runtime, OpenVINO, TensorRT): latency per batch, costs,
    op times, memory."""
    check_target(target)
    if runs is not None and seconds is not None:
        raise OptionError("give --runs or --seconds, not both")
    for path, flag in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None:
            check_output_file(path, flag)
    if plot_path:
        from prunec.report.plot import check_plot_available

        check_plot_available()
    kw = dict(target=target, batches=batches, input_shapes=input_shapes, runs=runs,
              seconds=seconds, warmup=warmup, sessions=sessions, ops=not no_ops, memory=not no_memory,
              top=top, feeds=feeds)
    out = console()
    if feeds:
        from prunec.graph.io import load_model

        announce_fixed(out, load_model(model).model, feeds)
    if stderr_is_terminal():
        bar = _Bar(Console(stderr=True))
        progress = bar
    else:
        bar = ProgressLines("profile")
        progress = bar.update
    with bar:
        if other is None:
            report = profile_model(model, progress=progress, **kw)
        else:
            report = compare_models(model, other, progress=progress, **kw)

    from prunec.report.profile import render

    render(out, report)
    if json_path:
        write_text_atomic(json_path, json.dumps(report.to_dict(samples=samples), indent=2), f"--json {json_path}")
    if plot_path:
        from prunec.report.plot import plot_latency

        plot_latency(report, plot_path)
    outputs = ", ".join(p for p in (json_path, plot_path) if p)
    out.print(f"[green]DONE[/green]: profiled{' (wrote ' + outputs + ')' if outputs else ''}")


# --- the profile step of `prunec run` -------------------------------------------------------

#: Timing budget per batch size in `prunec run`: enough for a stable median on small models,
#: short enough for the demo to stay quick. `prunec profile` is the tool for careful numbers.
RUN_PROFILE_SECONDS = 1.0


@dataclass(frozen=True)
class RunProfileOptions:
    """What `prunec run` forwards to its closing profile."""

    enabled: bool
    target: Target
    batches: tuple[int, ...]

    @property
    def provider(self) -> str:
        return self.target.provider

    @property
    def threads(self) -> int | None:
        return self.target.threads


def run_profile_options(f):
    """--no-profile, --runtime/--provider/--device/--precision/--threads, --batch for `prunec run`,
    collapsed into `profile_opts`. The target also tells the passes where the model will run
    (`channels` rounds widths for it).

    The target is checked here, before any pass runs, so a typo fails fast with no output.
    """

    @click.option("--no-profile", is_flag=True,
                  help="Skip timing the input and output models at the end "
                       "(done on the --runtime target at each --batch size; passes always verify on "
                       "ONNX Runtime CPU).")
    @runtime_options
    @batch_option()
    @functools.wraps(f)
    def wrapper(*args, no_profile: bool, target: Target, batches, **kwargs):
        if not no_profile:
            check_target(target)
        opts = RunProfileOptions(not no_profile, target, tuple(batches))
        return f(*args, profile_opts=opts, **kwargs)

    return wrapper


def profile_after_run(console: Console, before: onnx.ModelProto, after: onnx.ModelProto,
                      opts: RunProfileOptions, input_shapes=None, labels=(None, None),
                      feeds=None) -> dict | None:
    """Time the original against the rewritten model, print the speedup line; JSON for --report."""
    if not opts.enabled:
        return None
    from prunec.report.profile import speedup_line

    report: CompareReport = compare_models(
        before, after, target=opts.target, batches=opts.batches,
        input_shapes=input_shapes, seconds=RUN_PROFILE_SECONDS, warmup=2, ops=False, memory=False,
        labels=labels, feeds=feeds)
    console.print(speedup_line(report))
    return report.to_dict()
