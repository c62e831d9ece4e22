"""`prunec check`: compare a pruned model with its original on every data slice; exit 3 on failure."""

from __future__ import annotations

import click

from prunec.cli.eval_options import console, data_options, gate_options, require_data, show_gate
from prunec.cli.options import runtime_options
from prunec.graph.io import load_model
from prunec.runtime.runtimes import check_target


@click.command("check")
@click.argument("original", type=click.Path(path_type=str))
@click.argument("pruned", type=click.Path(path_type=str))
@data_options
@gate_options
@runtime_options
@click.option("--json", "json_path", default=None, type=click.Path(path_type=str),
              help="Write the gate report as JSON here.")
def command(original: str, pruned: str, data_args, eval_args, target, json_path: str | None) -> None:
    """Gate PRUNED against ORIGINAL: metric per slice (classes, rare, user, length, corruptions)."""
    require_data(data_args)
    check_target(target)
    ref = load_model(original).model
    cand = load_model(pruned).model
    data = data_args.load(ref)
    report = eval_args.evaluator(ref, data, target=target).compare(
        cand, eval_args.thresholds)
    show_gate(report, console(), json_path)
    report.raise_if_failed()
