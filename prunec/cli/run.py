"""`prunec run`: load, apply passes (verifying after each), save atomically, summarise."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from prunec.cli.diff import PassDiffs, write_run_diff
from prunec.cli.eval_options import calib_options, calibration_note, data_options, gate_before_save, gate_options
from prunec.cli.options import input_shape_options, model_argument
from prunec.cli.profile import profile_after_run, run_profile_options
from prunec.errors import OptionError
from prunec.graph.io import check_output_path, load_model, save_model
from prunec.passes import PassContext, PassManager, build_passes, load_recipe
from prunec.passes.base import parse_option_flags
from prunec.passes.manager import parse_pass_list
from prunec.report.files import check_output_file
from prunec.report.sparse import sparse_table
from prunec.report.summary import run_table, skipped_table

#: Passes after which `run` prints the sparse profile.
SPARSE_PASSES = ("2to4", "sparsity", "csr")


def _sparse_profile(original, result, report, input_shapes, seed: int, profile: dict | None):
    """The honest sparse profile of the result against the original, when a sparse pass ran;
    its latency is the run's closing profile (None with --no-profile: no speed claim)."""
    if not any(p.name in SPARSE_PASSES for p in report.passes):
        return None
    from prunec.eval.sparse import adopt_latency, profile_sparse

    timings = [t for p in report.passes if p.name == "csr" for t in p.result.details.get("timings", [])]
    prof = profile_sparse(original, result, input_shapes=input_shapes, seed=seed, runs=0,
                          layer_timings=timings)
    return adopt_latency(prof, profile) if profile else prof


def _write_json(path: str, doc: dict) -> None:
    from prunec.report.files import write_text_atomic

    write_text_atomic(path, json.dumps(doc, indent=2))


@click.command("run")
@model_argument
@click.option("--passes", "passes_text", default=None, metavar="A,B,C",
              help="Passes to apply, in order (see `prunec passes`).")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="TOML recipe: passes = [...] and a [pass] table of options per pass.")
@click.option("-O", "option_flags", multiple=True, metavar="PASS.KEY=VALUE",
              help="Set a pass option, e.g. -O channels.ratio=0.5. Repeatable; overrides the recipe.")
@click.option("-o", "--output", default=None, type=click.Path(path_type=str),
              help="Where to write the rewritten model.")
@click.option("--in-place", is_flag=True, help="Allow the output to overwrite the input model.")
@input_shape_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random verification inputs.")
@click.option("--rtol", type=float, default=1e-4, show_default=True,
              help="Relative tolerance for exact passes (max abs error / max |reference|).")
@click.option("--report", "report_path", default=None, type=click.Path(path_type=str),
              help="Write the machine-readable run summary as JSON here.")
@click.option("--diff", "diff_path", default=None, type=click.Path(path_type=str),
              help="Write the diff of the whole run (input vs output) here: HTML, or JSON for *.json.")
@click.option("--diff-each", "diff_dir", default=None, type=click.Path(path_type=str),
              help="Write one HTML diff per pass into this folder (NN-pass.html).")
@data_options
@calib_options
@gate_options
@click.option("--force", is_flag=True, help="Write the output even when the --data accuracy gate fails.")
@run_profile_options
def command(model: str, passes_text: str | None, recipe: str | None, option_flags, output: str | None,
            in_place: bool, input_shapes, seed: int, rtol: float, report_path: str | None, diff_path: str | None, diff_dir: str | None, data_args, calib_args,
            eval_args, force: bool, profile_opts) -> None:
    """Apply passes to MODEL, verify after each one, and write the result to -o."""
    names, options = [], {}
    if recipe:
        names, options = load_recipe(recipe)
    if passes_text:
        names = parse_pass_list(passes_text)
    if not names:
        raise OptionError("no passes given; use --passes a,b or --recipe file.toml")
    for pname, kv in parse_option_flags(option_flags).items():
        options.setdefault(pname, {}).update(kv)
    if output is None:
        if not in_place:
            raise OptionError("no output given; use -o out.onnx (or --in-place to overwrite the input)")
        output = model
    passes = build_passes(names, options)
    if report_path:
        check_output_file(report_path, "--report")
    loaded = load_model(model)
    check_output_path(output, loaded.path, in_place=in_place)
    if diff_path:
        check_output_file(diff_path, "--diff")
        in_bytes = loaded.path.stat().st_size  # before an --in-place save replaces it
    pass_diffs = PassDiffs(loaded.model, diff_dir, input_shapes)

    console = Console(stderr=False)
    data = data_args.load(loaded.model)
    calib = calib_args.load(loaded.model, data_args, data, seed=seed)  # --calib, else --data
    ctx = PassContext(input_shapes=input_shapes, seed=seed, calib=calib)
    manager = PassManager(passes, ctx=ctx, rtol=rtol, on_pass=pass_diffs.on_pass if diff_dir else None)
    result, report = manager.run(loaded.model)
    gate = gate_before_save(loaded.model, result, data, eval_args, force=force)
    save_model(result, output, input_path=loaded.path, in_place=in_place)
    if diff_path:
        write_run_diff(diff_path, loaded.model, result, (str(loaded.path), str(output)),
                       input_shapes=input_shapes, file_sizes=(in_bytes, Path(output).stat().st_size))
    pass_diffs.write()

    console.print(run_table(report))
    note = calibration_note(report)
    if note:
        console.print(note)
    skipped = skipped_table(report)
    if skipped is not None:
        console.print(skipped)
    if report.final_deviation:
        worst = max(d["rel"] for d in report.final_deviation.values())
        console.print(f"output deviation from the original: max relative {worst:.3g}")
    profile = profile_after_run(console, loaded.model, result, profile_opts, input_shapes,
                                labels=(str(loaded.path), str(output)))
    sparse = _sparse_profile(loaded.model, result, report, input_shapes, seed, profile)
    if sparse is not None:
        console.print(sparse_table(sparse))
    if report_path:
        doc = {"input": str(loaded.path), "output": str(output), "passes_requested": names,
               **report.to_dict(), "gate": gate.to_dict() if gate else None, "profile": profile}
        if sparse is not None:
            doc["sparse_profile"] = sparse.to_dict()
        _write_json(report_path, doc)
    if gate is not None and any(not p.exact for p in passes):
        from prunec.report.robust import robustness_lines

        for line in robustness_lines(gate):
            console.print(escape(line), soft_wrap=True)
    argv = click.get_current_context().meta.get("prunec.argv", sys.argv[1:])
    console.print(f"[green]PASSED[/green]: wrote {escape(str(output))} | prunec {escape(shlex.join(argv))}",
                  soft_wrap=True)
