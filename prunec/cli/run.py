"""`prunec run`: load, apply passes (verifying after each), save atomically, summarise."""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

import click
from rich.markup import escape

from prunec.cli.diff import PassDiffs, write_run_diff
from prunec.cli.eval_options import calib_options, calibration_note, data_options, gate_candidate, gate_options
from prunec.cli.options import announce_fixed, feed_option, input_shape_options, model_argument
from prunec.cli.profile import profile_after_run, run_profile_options
from prunec.errors import GateFailure, ModelSaveError, OptionError
from prunec.graph.io import check_output_path, load_model, save_model, write_target
from prunec.graph.store import Store
from prunec.passes import PassContext, PassManager, build_passes, load_recipe
from prunec.passes.base import parse_option_flags
from prunec.passes.manager import parse_pass_list
from prunec.report.console import ProgressLines, console, stderr_is_terminal
from prunec.report.files import check_output_file, check_output_folder
from prunec.runtime.inputs import chosen_sizes, resolve_input_shapes, sized_dims_note
from prunec.report.sparse import sparse_table
from prunec.report.summary import fidelity_table, normalized_note, run_table, skipped_table, verdict

#: Passes after which `run` prints the sparse profile.
SPARSE_PASSES = ("2to4", "sparsity", "csr")


def _sparse_profile(loaded, result, report, input_shapes, seed: int, profile: dict | None, feeds=None):
    """The honest sparse profile of the result against the original, when a sparse pass ran;
    its latency is the run's closing profile (None with --no-profile: no speed claim)."""
    if not any(p.name in SPARSE_PASSES for p in report.passes):
        return None
    from prunec.eval.sparse import adopt_latency, profile_sparse

    timings = [t for p in report.passes if p.name == "csr" for t in p.result.details.get("timings", [])]
    prof = profile_sparse(loaded.model, result.load(), input_shapes=input_shapes, seed=seed, runs=0,
                          layer_timings=timings, feeds=feeds)
    return adopt_latency(prof, profile) if profile else prof


def _write_json(path: str, doc: dict) -> None:
    from prunec.report.files import write_text_atomic

    write_text_atomic(path, json.dumps(doc, indent=2), f"--report {path}")


@click.command("run")
@model_argument
@click.option("--passes", "passes_text", default=None, metavar="A,B,C",
              help="Passes to apply, in order (see `prunec passes`).")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="TOML recipe: passes = [...] and a [pass] table of options per pass.")
@click.option("-O", "option_flags", multiple=True, metavar="PASS.KEY=VALUE",
              help="Set a pass option, e.g. -O channels.ratio=0.5. Repeatable; overrides the recipe.")
@click.option("-o", "--output", default=None, type=click.Path(path_type=str),
              help="Where to write the rewritten model (a regular file; a symlink's target is replaced).")
@click.option("--in-place", is_flag=True, help="Allow the output to overwrite the input model.")
@input_shape_options
@feed_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random verification inputs.")
@click.option("--rtol", type=float, default=None,
              help="Tolerance of exact passes and of the proofs of lossy ones (max abs error / max "
                   "|reference|). Default by the model's precision: 1e-4 float32, 1e-2 float16, "
                   "5e-2 bfloat16, 1e-9 float64.")
@click.option("--min-cosine", type=float, default=None, metavar="X",
              help="Fail (exit 3, nothing written) if any output's cosine similarity to the "
                   "original's is below X (on --data samples when given, else random inputs).")
@click.option("--max-deviation", type=float, default=None, metavar="X",
              help="Fail (exit 3, nothing written) if any output's relative deviation from the "
                   "original's (max abs error / max |original|) is above X.")
@click.option("--keep-failed", "keep_failed", default=None, type=click.Path(path_type=str), metavar="DIR",
              help="When verification fails, write the failing model (and the proof's reference) "
                   "and failure.json saying what failed into DIR, for a bug report.")
@click.option("--report", "--json", "report_path", default=None, type=click.Path(path_type=str),
              metavar="PATH", help="Write the machine-readable run summary as JSON here.")
@click.option("--diff", "diff_path", default=None, type=click.Path(path_type=str),
              help="Write the diff of the whole run (input vs output) here: HTML, or JSON for *.json.")
@click.option("--diff-each", "diff_dir", default=None, type=click.Path(path_type=str),
              help="Write one HTML diff per pass into this folder (NN-pass.html).")
@data_options
@calib_options
@gate_options
@click.option("--force", is_flag=True,
              help="Write the output even when the --data accuracy gate fails (the run ends FORCED, exit 0).")
@click.option("--allow-interface-change", is_flag=True,
              help="Let the heads pass change graph input/output shapes (a decoder's KV cache carries the "
                   "head count); verified on sliced data, flagged BREAKING by `prunec diff`.")
@run_profile_options
def command(model: str, passes_text: str | None, recipe: str | None, option_flags, output: str | None,
            in_place: bool, input_shapes, feeds, seed: int, rtol: float | None, min_cosine: float | None,
            max_deviation: float | None, keep_failed: str | None, report_path: str | None,
            diff_path: str | None, diff_dir: str | None, data_args, calib_args, eval_args, force: bool,
            allow_interface_change: bool, profile_opts) -> None:
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
    # Every output path is checked before any work, so a typo never costs a run.
    if report_path:
        check_output_file(report_path, "--report")
    if keep_failed and Path(keep_failed).exists() and not Path(keep_failed).is_dir():
        raise OptionError(f"--keep-failed {keep_failed}: exists and is not a folder")
    # Large weights are read later, from the file straight into the graph the run edits.
    loaded = load_model(model, lazy_weights=not in_place)
    check_output_path(output, loaded.path, in_place=in_place)
    # A dim prunec cannot size fails here, not after the gate has run the original over --data.
    resolve_input_shapes(loaded.structure, input_shapes)
    if diff_path:
        check_output_file(diff_path, "--diff")
        in_bytes = loaded.path.stat().st_size  # before an --in-place save replaces it
    if diff_dir:
        check_output_folder(diff_dir, "--diff-each")
    pass_diffs = PassDiffs(loaded.model if diff_dir else None, diff_dir, input_shapes)
    # Where the run keeps its models (the output's folder: big temp data stays on that disk).
    store = Store(write_target(output).parent, label=str(output), error=ModelSaveError)
    click.get_current_context().call_on_close(store.close)

    out = console()
    announce_fixed(out, loaded.structure, feeds)
    lines = None if stderr_is_terminal() else ProgressLines("run")
    with lines or nullcontext():
        data = data_args.load(loaded.structure, feeds)  # also the calibration data of passes that need it
        # Built before the passes: bad data, labels or thresholds fail before any work.
        evaluator = eval_args.evaluator(loaded.model, data, progress=lines) if data else None
        calib = calib_args.load(loaded.structure, data_args, data, seed=seed)  # --calib, else --data
        ctx = PassContext(input_shapes=input_shapes, seed=seed, data=data.inputs if data else None,
                          target=profile_opts.target,
                          feeds=feeds, allow_interface_change=allow_interface_change,
                          calib=calib)

        def on_pass(index, record, model_after):
            if diff_dir:
                pass_diffs.on_pass(index, record, model_after.load())
            if lines:
                lines(index + 1, len(passes), f"pass {record.name} verified")

        manager = PassManager(passes, ctx=ctx, rtol=rtol, on_pass=on_pass if diff_dir or lines else None,
                              keep_failed=keep_failed)
        if lines:
            lines.phase(f"applying {len(passes)} pass(es), verifying after each")
        # The run takes the input's protobuf over (its weights are then held once), unless the
        # output replaces the input file, which the closing profile and diff still read.
        result, report = manager.run_in(store, loaded.model if in_place else loaded)
        fidelity_gate(report, min_cosine, max_deviation, force=force, out=out)
        gate = gate_candidate(evaluator, result.load(), eval_args, out) if evaluator else None
    forced = gate is not None and not gate.passed
    if forced and not force:
        # The evidence is written (marked failed); the model never is.
        label = f"{output} (not written: accuracy gate failed)"
        if diff_path:
            write_run_diff(diff_path, loaded.model, result.load(), (str(loaded.path), label), input_shapes=input_shapes)
        pass_diffs.write()
        if report_path:
            _write_json(report_path, {"input": str(loaded.path), "output": str(output), "written": False,
                                      "passes_requested": names, **report.to_dict(), "gate": gate.to_dict(),
                                      "profile": None})
        _robustness(out, gate, passes)
        gate.raise_if_failed()
    save_model(result, output, input_path=loaded.path, in_place=in_place)
    if diff_path:
        write_run_diff(diff_path, loaded.model, result.load(), (str(loaded.path), str(output)),
                       input_shapes=input_shapes, file_sizes=(in_bytes, Path(output).stat().st_size))
    pass_diffs.write()

    chosen = chosen_sizes(loaded.structure, input_shapes)  # the interface: no weights needed
    if chosen:
        out.print(sized_dims_note(chosen, verification=True))
    out.print(run_table(report))
    note = normalized_note(report)
    if note:
        out.print(note)
    note = calibration_note(report)
    if note:
        out.print(note)
    skipped = skipped_table(report)
    if skipped is not None:
        out.print(skipped)
    for p in report.passes:
        for note in p.result.notes:
            out.print(f"[yellow]{p.name}: {escape(note)}[/yellow]")
    fidelity = fidelity_table(report)
    if fidelity is not None:
        out.print(fidelity)
    # The input and output files themselves, unless the output replaced the input.
    original = loaded.path if not in_place and loaded.converted_from_opset is None else loaded.model
    profile = profile_after_run(out, original, Path(output), profile_opts, input_shapes,
                                labels=(str(loaded.path), str(output)), feeds=feeds)
    sparse = _sparse_profile(loaded, result, report, input_shapes, seed, profile, feeds)
    if sparse is not None:
        out.print(sparse_table(sparse))
    if report_path:
        doc = {"input": str(loaded.path), "output": str(output), "written": True, "passes_requested": names,
               "chosen_dims": chosen,
               **report.to_dict(), "gate": gate.to_dict() if gate else None, "profile": profile}
        if sparse is not None:
            doc["sparse_profile"] = sparse.to_dict()
        _write_json(report_path, doc)
    _robustness(out, gate, passes)
    argv = click.get_current_context().meta.get("prunec.argv", sys.argv[1:])
    out.print(verdict(report, str(output), shlex.join(argv), gate=gate), soft_wrap=True)


def _robustness(out, gate, passes) -> None:
    """After a gated lossy run, original -> pruned per slice family and the worst slice (issue 19)."""
    if gate is not None and any(not p.exact for p in passes):
        from rich.markup import escape

        from prunec.report.robust import robustness_lines

        for line in robustness_lines(gate):
            out.print(escape(line), soft_wrap=True)


def fidelity_gate(report, min_cosine: float | None, max_deviation: float | None, *, force: bool, out) -> None:
    """--min-cosine / --max-deviation: exit 3 before anything is written (unless --force)."""
    failures = report.fidelity_failures(min_cosine, max_deviation)
    if not failures:
        return
    msg = (f"fidelity to the original on {report.fidelity_on} fails: {failures[0]}"
           + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
    if not force:
        raise GateFailure(f"{msg}; nothing written")
    report.fidelity_forced = failures
    out.print(f"[yellow]--force: writing the model although the {msg}[/yellow]")
