"""`prunec potential`: sweep uniform channel ratios; the largest within δ, clean and per corruption."""

from __future__ import annotations

import json

import click

from prunec.cli.eval_options import calib_options, console, data_options, require_data
from prunec.cli.options import announce_fixed, input_shape_options, model_argument, runtime_options
from prunec.cli.sensitivity import (
    channel_options,
    check_cache,
    check_outputs,
    common_eval_options,
    executor_options,
    executor_settings,
    progress_bar,
)
from prunec.errors import DataError
from prunec.eval.corruptions import image_layout, parse_corruptions, parse_severities
from prunec.eval.gate import Evaluator
from prunec.eval.sensitivity import parse_ratios
from prunec.graph.io import load_model
from prunec.passes import PassContext
from prunec.runtime.inputs import graph_inputs


@click.command("potential")
@model_argument
@data_options
@calib_options
@click.option("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7", show_default=True,
              help="Uniform channel ratios to sweep.")
@click.option("--delta", type=float, default=0.5, show_default=True,
              help="Tolerance in points below the original's metric.")
@click.option("--corruptions", default="auto", show_default=True,
              help="auto (all, for image inputs), all, none, or a comma list.")
@click.option("--severities", default="3", show_default=True, help="Corruption severities (1-5).")
@click.option("--planned", is_flag=True,
              help="Sweep MAC budgets allocated from a sensitivity analysis instead of uniform ratios "
                   "(each ratio is then the fraction of MACs removed).")
@click.option("--sens-ratios", default="0.2,0.4,0.6", show_default=True,
              help="With --planned: ratios at which each group's sensitivity is measured (cached).")
@click.option("--cache", "cache_dir", default=None, type=click.Path(path_type=str),
              help="With --planned: sensitivity cache folder (default: $PRUNEC_CACHE or ~/.cache/prunec).")
@common_eval_options
@executor_options
@input_shape_options
@runtime_options
def command(model: str, data_args, calib_args, ratios: str, delta: float, corruptions: str, severities: str, planned: bool,
            sens_ratios: str, cache_dir: str | None, option_flags,
            eval_output, batch_size: int | str, json_path, plot_path, metric, feeds, jobs: int | None, executor: str,
            address: str | None, input_shapes, target) -> None:
    """Prune MODEL uniformly at each ratio; report the prune potential on clean and corrupted data."""
    from prunec.eval.potential import prune_potential
    from prunec.report.files import write_text_atomic
    from prunec.report.sensitivity import plot_potential, potential_table

    require_data(data_args)
    ratio_list = parse_ratios(ratios)
    options = channel_options(option_flags)
    if delta < 0:
        raise DataError("--delta must be >= 0")
    check_outputs(json_path, plot_path)
    spread = executor_settings(jobs, executor, address)
    loaded = load_model(model)
    cache = None
    if planned:
        from pathlib import Path

        from prunec.eval.sensitivity import default_cache_dir

        cache = check_cache(Path(cache_dir) if cache_dir else default_cache_dir())
    out = console()
    announce_fixed(out, loaded.model, feeds)
    data = data_args.load(loaded.model, feeds)
    if corruptions == "auto":
        images = any(s.dtype.kind == "f" and image_layout(s.dims) for s in graph_inputs(loaded.model))
        names = parse_corruptions("all" if images else "none")
    else:
        names = parse_corruptions(corruptions)
    ctx = PassContext(input_shapes=input_shapes, data=data.inputs, feeds=feeds, target=target,
                      calib=calib_args.load(loaded.model, data_args, data))
    sens = None
    bar, update = progress_bar("potential")
    with bar:
        evaluator = Evaluator(loaded.model, data, corruptions=names, severities=parse_severities(severities),
                              output=eval_output, batch_size=batch_size, target=target,
                              metric=metric, progress=update)
        if planned:
            from prunec.eval.sensitivity import sensitivity

            sens = sensitivity(loaded.model, evaluator, parse_ratios(sens_ratios), ctx=ctx, options=options,
                               cache=cache, progress=update, executor=spread)
        report = prune_potential(loaded.model, evaluator, ratio_list, delta=delta, ctx=ctx, options=options,
                                 sensitivity=sens, progress=update, executor=spread)
    out.print(potential_table(report))
    out.print(f"evaluated at {evaluator.batch.describe()}", style="dim")
    if plot_path:
        plot_potential(report, plot_path)
    if json_path:
        doc = {**report.to_dict(), "batch": evaluator.batch.to_dict()}
        write_text_atomic(json_path, json.dumps(doc, indent=2), f"--json {json_path}")
