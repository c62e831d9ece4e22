"""`prunec sensitivity`: prune one channel group at a time, table + plot; `--budget` writes a plan."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from prunec.cli.eval_options import calib_options, console, data_options, require_data
from prunec.cli.options import (announce_fixed, batch_size_option, feed_option, input_shape_options, json_option,
                                metric_option, model_argument, runtime_options)
from prunec.errors import BudgetTooLossy, OptionError, OutputFileError
from prunec.eval.gate import Evaluator
from prunec.eval.sensitivity import default_cache_dir, parse_ratios
from prunec.graph.io import check_output_path, check_writable_folder, load_model
from prunec.passes import PassContext
from prunec.passes.base import parse_option_flags
from prunec.report.console import ProgressLines, stderr_is_terminal
from prunec.report.files import check_output_file


def channel_options(flags) -> dict:
    """-O channels.key=value flags for the channels pass (ratio and plan are set by the command)."""
    parsed = parse_option_flags(flags)
    stray = sorted(set(parsed) - {"channels"})
    if stray:
        raise OptionError(f"-O here only takes channels.* options, got {', '.join(stray)}")
    opts = parsed.get("channels", {})
    fixed = sorted({"ratio", "plan"} & set(opts))
    if fixed:
        raise OptionError(f"-O channels.{fixed[0]} is set by this command; use --ratios / --budget")
    return opts


def progress_bar(what: str = "measuring"):
    """A progress bar on stderr (plain lines when stderr is not a terminal); returns
    (context manager, callback(done, total, label))."""
    if not stderr_is_terminal():
        lines = ProgressLines(what)
        return lines, lines
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task("measuring", total=None)

    def update(done: int, total: int, label: str) -> None:
        bar.update(task, completed=done, total=total, description=label)

    return bar, update


def common_eval_options(f):
    """Options shared by sensitivity and potential: the channels pass's own options and evaluation details."""
    for deco in reversed([
        click.option("-O", "option_flags", multiple=True, metavar="channels.KEY=VALUE",
                     help="Options of the channels pass, e.g. -O channels.importance=l2."),
        click.option("--eval-output", default=None, help="Model output to evaluate (default: the first)."),
        batch_size_option,
        json_option("Write the results as JSON here."),
        click.option("--plot", "plot_path", default=None, type=click.Path(path_type=str),
                     help="Write a plot (PNG/SVG/PDF by suffix; needs matplotlib)."),
        metric_option,
        feed_option,
    ]):
        f = deco(f)
    return f


def executor_options(f):
    """--jobs, --executor, --address: where the independent trials of a sweep run."""
    for deco in reversed([
        click.option("--jobs", type=int, default=None,
                     help="Workers for the trials; 0: one per core (local) or per cluster CPU (ray). "
                          "Default: 1 locally, since ONNX Runtime already uses every core within a trial; "
                          "every cluster CPU with ray. Results do not depend on it."),
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: this machine (a process pool when --jobs > 1); ray: Ray workers "
                          "(pip install 'prunec[cluster]')."),
        click.option("--address", default=None, metavar="ADDR",
                     help="With --executor ray: join this Ray cluster (ray://host:10001, or auto) "
                          "instead of starting a local one."),
    ]):
        f = deco(f)
    return f


def executor_settings(jobs: int | None, executor: str, address: str | None):
    """The ExecutorSettings the options above ask for."""
    from prunec.eval.executor import ExecutorSettings

    return ExecutorSettings(jobs=jobs, kind=executor, address=address)


def check_outputs(json_path: str | None, plot_path: str | None) -> None:
    """--json and --plot can be written (checked before any work)."""
    if json_path:
        check_output_file(json_path, "--json")
    if plot_path:
        from prunec.report.plot import check_plot_available

        check_output_file(plot_path, "--plot")
        check_plot_available()


def check_cache(folder: Path) -> Path:
    """The sensitivity cache folder exists (created) and is writable, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFileError(f"--cache {folder}: cannot create it: {exc.strerror or exc} "
                              "(use --no-cache or --cache DIR)") from None
    check_writable_folder(folder, f"--cache {folder}", OutputFileError)
    return folder


@click.command("sensitivity")
@model_argument
@data_options
@calib_options
@click.option("--ratios", default="0.1,0.2,0.4", show_default=True, help="Ratios at which each group is pruned.")
@click.option("--budget", default=None, metavar="macs=F|params=F|latency=F",
              help="Allocate per-group ratios keeping fraction F of MACs, params or measured latency "
                   "(timed against the original on --runtime/--provider/--device at --latency-batch); writes --plan-out.")
@click.option("--latency-batch", type=int, default=1, show_default=True,
              help="Batch size at which a latency budget is measured.")
@click.option("--plan-out", default="plan.json", show_default=True, type=click.Path(path_type=str),
              help="Where --budget writes the plan (use with -O channels.plan=PATH).")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="With --budget: a plan whose predicted drop exceeds this many points is not written "
                   "(exit 3) unless --force.")
@click.option("--force", is_flag=True, help="With --budget: write the plan even when it predicts more than --max-drop.")
@click.option("--cache", "cache_dir", default=None, type=click.Path(path_type=str),
              help="Folder for resumable results (default: $PRUNEC_CACHE or ~/.cache/prunec).")
@click.option("--corruptions", default="auto", show_default=True,
              help="Corrupted slices each trial is also scored on (its drop is the worst gated one): "
                   "auto (all, for image inputs), all, none, or a comma list.")
@click.option("--severities", default="3", show_default=True, help="Corruption severities (1-5).")
@click.option("--no-cache", is_flag=True, help="Measure everything again and store nothing.")
@common_eval_options
@executor_options
@input_shape_options
@runtime_options
def command(model: str, data_args, calib_args, ratios: str, budget: str | None, latency_batch: int, plan_out: str,
            corruptions: str, severities: str,
            max_drop: float, force: bool, cache_dir: str | None,
            no_cache: bool, option_flags, eval_output, batch_size: int | str, json_path, plot_path, metric, feeds,
            jobs: int | None, executor: str, address: str | None, input_shapes, target) -> None:
    """Prune each channel group of MODEL alone at each ratio and measure the metric drop."""
    from prunec.eval.budget import LatencySettings, allocate, measured_latency, parse_budget
    from prunec.eval.sensitivity import sensitivity
    from prunec.report.files import write_text_atomic
    from prunec.report.sensitivity import plan_table, plot_sensitivity, sensitivity_table

    require_data(data_args)
    ratio_list = parse_ratios(ratios)
    options = channel_options(option_flags)
    the_budget = parse_budget(budget) if budget else None
    check_outputs(json_path, plot_path)
    spread = executor_settings(jobs, executor, address)
    loaded = load_model(model)
    if the_budget:
        check_output_path(plan_out, loaded.path, in_place=False)
    cache = None if no_cache else check_cache(Path(cache_dir) if cache_dir else default_cache_dir())
    out = console()
    announce_fixed(out, loaded.model, feeds)
    data = data_args.load(loaded.model, feeds)
    ctx = PassContext(input_shapes=input_shapes, data=data.inputs, feeds=feeds, target=target,
                      calib=calib_args.load(loaded.model, data_args, data))
    bar, update = progress_bar("sensitivity")
    with bar:
        from prunec.eval.corruptions import parse_severities
        from prunec.eval.robust import auto_corruptions

        evaluator = Evaluator(loaded.model, data, output=eval_output, batch_size=batch_size,
                              target=target, metric=metric, progress=update,  # drops: worst gated slice
                              corruptions=auto_corruptions(loaded.model, corruptions),
                              severities=parse_severities(severities))
        report = sensitivity(loaded.model, evaluator, ratio_list, ctx=ctx, options=options,
                             cache=cache, progress=update, executor=spread)
    out.print(sensitivity_table(report))
    out.print(f"evaluated at {evaluator.batch.describe()}", style="dim")
    if report.cached_trials:
        out.print(f"{report.cached_trials} trial(s) reused from the cache in {cache}")
    doc = {"sensitivity": report.to_dict(), "batch": evaluator.batch.to_dict()}
    if the_budget:
        meter = measured_latency(LatencySettings(batch=latency_batch, target=target),
                                 input_shapes, feeds) if the_budget.kind == "latency" else None
        plan = allocate(loaded.model, report, the_budget, ctx=ctx, options=options, latency=meter)
        out.print(plan_table(plan, report))
        doc["plan"] = plan.to_dict()
        lossy = plan.predicted_drop > max_drop + 1e-9
        if lossy:
            out.print(f"[yellow]warning[/yellow]: the plan for --budget {the_budget} predicts a drop of "
                      f"{plan.predicted_drop:.2f} points, more than --max-drop {max_drop:g}", soft_wrap=True)
        doc["plan_written"] = not lossy or force
        if not lossy or force:
            write_text_atomic(plan_out, json.dumps(plan.to_dict(), indent=2), f"--plan-out {plan_out}")
            out.print(f"wrote plan {plan_out}: prunec run {model} --passes channels "
                      f"-O channels.plan={plan_out} -o pruned.onnx", soft_wrap=True)
    if plot_path:
        plot_sensitivity(report, plot_path)
    if json_path:
        write_text_atomic(json_path, json.dumps(doc, indent=2), f"--json {json_path}")
    if the_budget and not doc["plan_written"]:
        raise BudgetTooLossy(f"--budget {the_budget}: the plan predicts a drop of {plan.predicted_drop:.2f} "
                             f"points, more than --max-drop {max_drop:g}; plan not written (--force writes it)")
