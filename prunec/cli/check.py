"""`prunec check`: compare a pruned model with its original on every data slice; exit 3 on failure."""

from __future__ import annotations

from contextlib import nullcontext

import click

from prunec.cli.eval_options import console, data_options, gate_options, require_data, show_gate
from prunec.cli.options import announce_fixed, feed_option, json_option, runtime_options
from prunec.graph.io import load_model
from prunec.report.console import ProgressLines, stderr_is_terminal
from prunec.report.files import check_output_file
from prunec.runtime.runtimes import check_target


@click.command("check")
@click.argument("original", type=click.Path(path_type=str))
@click.argument("pruned", type=click.Path(path_type=str))
@data_options
@gate_options
@feed_option
@runtime_options
@json_option("Write the gate report as JSON here (also when the gate fails).")
def command(original: str, pruned: str, data_args, eval_args, feeds, target, json_path: str | None) -> None:
    """Gate PRUNED against ORIGINAL: metric per slice (classes, rare, user, length, corruptions)."""
    require_data(data_args)
    check_target(target)
    if json_path:
        check_output_file(json_path, "--json")
    ref = load_model(original).model
    cand = load_model(pruned).model
    out = console()
    announce_fixed(out, ref, feeds)
    data = data_args.load(ref, feeds)
    lines = None if stderr_is_terminal() else ProgressLines("check")
    with lines or nullcontext():
        report = eval_args.evaluator(ref, data, target=target, progress=lines).compare(cand, eval_args.thresholds)
    show_gate(report, out, json_path)
    report.raise_if_failed()
