"""Option groups for commands that read evaluation data and gate on accuracy (check, run, sensitivity).

Defined once so `--data`, `--max-drop`, `--corruptions`, `--metric` mean the same in every command.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import click
import onnx
from rich.console import Console

from prunec.cli.options import batch_size_option, metric_option
from prunec.errors import GateFailure, OptionError
from prunec.eval.corruptions import image_layout, parse_corruptions, parse_severities
from prunec.eval.data import EvalData, Preprocess, load_calibration, load_data
from prunec.eval.gate import CHANCE_MARGIN, Evaluator, GateReport, GateThresholds, parse_slice_max_drop
from prunec.eval.slice_names import expected_slice_names
from prunec.eval.task_metric import TaskMetric
from prunec.report.console import console
from prunec.runtime.inputs import graph_inputs


@dataclass
class DataArgs:
    """Where the evaluation data is and how to preprocess image folders."""

    path: str | None
    preprocess: Preprocess

    def load(self, model: onnx.ModelProto, feeds: dict | None = None) -> EvalData | None:
        """The data checked against `model`, or None when no --data was given; `feeds` (--feed)
        fix inputs the data does not hold."""
        return load_data(self.path, model, preprocess=self.preprocess, feeds=feeds) if self.path else None


@dataclass
class EvalArgs:
    """Thresholds and evaluation settings parsed from the command line."""

    thresholds: GateThresholds
    corruptions: str
    severities: list[int]
    output: str | None
    top_k: int
    batch_size: int | str
    seed: int = 0
    metric: TaskMetric | None = None

    def evaluator(self, original: onnx.ModelProto, data: EvalData, *, provider: str = "cpu",
                  threads: int | None = None, progress=None, target=None) -> Evaluator:
        """An Evaluator for `original` with these settings (`auto` corruptions: all, for image inputs);
        it checks the --slice-max-drop names against the data's slices, before the original runs
        as far as the names are known without its outputs, and after. It runs on `target` (a
        prunec.runtime.target.Target; default ONNX Runtime on `provider`)."""
        if self.corruptions.strip().lower() == "auto":
            has_image = any(s.dtype.kind == "f" and image_layout(s.dims) for s in graph_inputs(original))
            corruptions = parse_corruptions("all" if has_image else "none")
        else:
            corruptions = parse_corruptions(self.corruptions)
        if self.thresholds.slice_max_drop:
            names = expected_slice_names(original, data, corruptions=corruptions, severities=self.severities,
                                         output=self.output, metric=self.metric)
            if names is not None:
                self.thresholds.check_names(names)
        ev = Evaluator(original, data, corruptions=corruptions, severities=self.severities,
                       output=self.output, top_k=self.top_k, batch_size=self.batch_size,
                       provider=provider, threads=threads, seed=self.seed, metric=self.metric,
                       progress=progress, target=target)
        ev.check_thresholds(self.thresholds)  # the backstop: names only the outputs tell
        return ev


def _parse_hw(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        h, w = (int(v) for v in value.lower().replace(",", "x").split("x"))
    except ValueError:
        raise OptionError(f"--resize {value!r}: expected HxW, e.g. 224x224") from None
    return h, w


def _floats(value: str | None, flag: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if not value:
        return default
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise OptionError(f"{flag} {value!r}: expected numbers, e.g. 0.485,0.456,0.406") from None


def data_options(f):
    """--data and image-folder preprocessing, parsed into `data_args: DataArgs`."""

    @click.option("--data", "data_path", default=None, type=click.Path(path_type=str),
                  help="Evaluation data: .npz (arrays named after the inputs, labels, targets, "
                       "slice_<name>) or a CSV / folder with labels.csv of file,label[,target][,slice...].")
    @click.option("--resize", default=None, metavar="HxW", help="Images: resize to HxW (default: model's size).")
    @click.option("--scale", type=float, default=1 / 255, show_default=True,
                  help="Images: multiply pixel values by this before mean/std.")
    @click.option("--mean", default=None, metavar="M[,M,M]", help="Images: per-channel mean to subtract.")
    @click.option("--std", default=None, metavar="S[,S,S]", help="Images: per-channel std to divide by.")
    @click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
                  help="Images: the model input's layout.")
    @click.option("--grayscale", is_flag=True, help="Images: convert to one channel.")
    @functools.wraps(f)
    def wrapper(*args, data_path, resize, scale, mean, std, layout, grayscale, **kwargs):
        pre = Preprocess(resize=_parse_hw(resize), scale=scale, mean=_floats(mean, "--mean", (0.0,)),
                         std=_floats(std, "--std", (1.0,)), layout=layout, grayscale=grayscale)
        return f(*args, data_args=DataArgs(data_path, pre), **kwargs)

    return wrapper


@dataclass
class CalibArgs:
    """Where the calibration samples are (--calib) and how many to use (--calib-samples)."""

    path: str | None
    samples: int | None
    #: Corrupted calibration views (prunec.eval.calib_views): auto|none|LIST, share, targets.
    corruptions: str = "auto"
    corrupt_fraction: float = 0.5
    view_targets: str = "view"

    def load(self, model: onnx.ModelProto, data_args: DataArgs, data: EvalData | None = None, *,
             seed: int = 0):
        """The Calibration passes get: --calib (image folders preprocessed like --data), else the
        gate's --data marked as not independent, else None. Samples are shuffled with `seed`
        (and cut to --calib-samples), so a pass that takes the first N gets a random N."""
        import numpy as np

        from prunec.passes.base import Calibration

        if self.path:
            data, source, independent = load_calibration(self.path, model, preprocess=data_args.preprocess), \
                self.path, True
        elif data is not None:
            source, independent = data.source or "--data", False
        else:
            return None
        arrays = data.inputs
        n = len(next(iter(arrays.values())))
        order = np.random.default_rng(seed).permutation(n)[: self.samples or n]
        mask = None
        if data.lengths is not None:  # padded sequences: real positions along axis 1
            width = next(v.shape[1] for v in arrays.values() if v.ndim >= 2)
            mask = np.arange(width)[None, :] < np.asarray(data.lengths)[:, None]
            mask = mask[order]
        calib = Calibration({k: v[order] for k, v in arrays.items()}, source, independent, mask)
        from prunec.eval.calib_views import add_views

        return add_views(calib, model, corruptions=self.corruptions, fraction=self.corrupt_fraction,
                         targets=self.view_targets, seed=seed)


def calib_options(f):
    """--calib and --calib-samples, parsed into `calib_args: CalibArgs`."""

    @click.option("--calib", "calib_path", default=None, type=click.Path(path_type=str),
                  help="Calibration samples for passes that measure the model (compensation, "
                       "reconstruct, recalibrate, data-driven importance): same formats as --data, "
                       "labels not needed; an image folder needs no labels.csv; an npz `lengths` "
                       "array (true length of each padded sequence) keeps padding out of the "
                       "statistics. Without it, such passes use --data, and the gate is then not "
                       "independent.")
    @click.option("--calib-samples", type=int, default=None, metavar="N",
                  help="Use N calibration samples (a seeded random subset; default: all). Passes "
                       "run over every sample they get, so this bounds their time.")
    @click.option("--calib-corruptions", default="auto", show_default=True,
                  help="Corrupted calibration views added for 4-D image inputs, so recovery keeps "
                       "robustness: auto (all corruptions at severities 1-5), none, or a comma list "
                       "(see --corruptions). Other inputs: none are added (the summary says so).")
    @click.option("--calib-corrupt-fraction", type=float, default=0.5, show_default=True,
                  help="Share of the calibration samples that are corrupted views (their weight in "
                       "every recovery objective; the clean samples are all kept).")
    @click.option("--calib-view-targets", type=click.Choice(["view", "clean"]), default="view",
                  show_default=True,
                  help="Recovery targets for a corrupted view: the original's output on that view, "
                       "or on the clean sample it was made from.")
    @functools.wraps(f)
    def wrapper(*args, calib_path, calib_samples, calib_corruptions, calib_corrupt_fraction,
                calib_view_targets, **kwargs):
        from prunec.eval.calib_views import check_fraction, parse_calib_corruptions

        if calib_samples is not None and calib_samples < 1:
            raise OptionError(f"--calib-samples {calib_samples}: expected a positive count")
        parse_calib_corruptions(calib_corruptions)  # validate early
        check_fraction(calib_corrupt_fraction)
        return f(*args, calib_args=CalibArgs(calib_path, calib_samples, calib_corruptions,
                                             calib_corrupt_fraction, calib_view_targets), **kwargs)

    return wrapper


def calibration_note(report) -> str | None:
    """The summary line saying which passes ran on which calibration data (None when none did),
    and that the gate is not independent when that data is the gate's own --data."""
    cal = getattr(report, "calibration", None)
    if not cal:
        return None
    line = f"calibration: {cal['samples']} samples of {cal['source']} used by {', '.join(cal['used_by'])}"
    views = f"\n{cal['views']}" if cal.get("views") else ""
    if cal.get("independent", True):
        return line + views
    return (f"{line}. note: that is --data (no --calib): the accuracy gate then measures on samples "
            "the model was fitted to, so it is not independent" + views)


def gate_options(f):
    """Thresholds and evaluation settings, parsed into `eval_args: EvalArgs`."""

    @click.option("--max-drop", type=float, default=1.0, show_default=True,
                  help="Largest allowed metric drop in points, on every slice.")
    @click.option("--slice-max-drop", multiple=True, metavar="SLICE=POINTS",
                  help="Override --max-drop for a slice name, kind (class, rare, user, length, "
                       "corruption) or glob (gaussian_noise@*); a name matching no slice is an error. "
                       "Repeatable.")
    @click.option("--min-agreement", type=float, default=None,
                  help="Smallest allowed top-1 agreement with the original per slice, e.g. 0.97.")
    @click.option("--min-samples", type=int, default=30, show_default=True,
                  help="Slices with fewer samples are flagged as not evidence.")
    @click.option("--fail-on-small-slices", is_flag=True, help="Fail the gate on slices under --min-samples.")
    @click.option("--corruptions", default="auto", show_default=True,
                  help="Corruption slices: auto (all, for image inputs), all, none, or a comma list "
                       "of gaussian_noise, shot_noise, gaussian_blur, contrast, brightness, pixelate, "
                       "and rotation (small in-plane rotations; never part of all: all,rotation adds it).")
    @click.option("--severities", default="3", show_default=True, help="Corruption severities (1-5), e.g. 1,3,5.")
    @click.option("--eval-output", default=None, help="Model output to evaluate (default: the first).")
    @click.option("--chance-margin", type=float, default=CHANCE_MARGIN, show_default=True,
                  help="Corrupted slices where the original scores less than this many points above "
                       "chance (100/classes for top-1; a task metric's `chance`) are flagged, not gated.")
    @click.option("--gate-near-chance", is_flag=True, help="Gate near-chance corrupted slices anyway.")
    @click.option("--top-k", type=int, default=1, show_default=True, help="Also report top-k accuracy.")
    @batch_size_option
    @metric_option
    @functools.wraps(f)
    def wrapper(*args, max_drop, slice_max_drop, min_agreement, min_samples, fail_on_small_slices,
                corruptions, severities, chance_margin, gate_near_chance, eval_output, top_k, batch_size,
                metric, **kwargs):
        if min_agreement is not None and not 0 <= min_agreement <= 1:
            raise OptionError(f"--min-agreement {min_agreement}: expected a fraction, e.g. 0.97")
        if top_k < 1:
            raise OptionError("--top-k must be positive")
        parse_corruptions(None if corruptions == "auto" else corruptions)  # validate early
        th = GateThresholds(max_drop, parse_slice_max_drop(slice_max_drop), min_agreement,
                            min_samples, fail_on_small_slices, chance_margin, gate_near_chance)
        ea = EvalArgs(th, corruptions, parse_severities(severities), eval_output, top_k, batch_size,
                      metric=metric)
        return f(*args, eval_args=ea, **kwargs)

    return wrapper


def show_gate(report: GateReport, console: Console, json_path: str | None = None) -> None:
    """Print the gate table and verdict; write the JSON report when asked."""
    from prunec.report.files import write_text_atomic
    from prunec.report.gate import gate_reasons, gate_table, gate_verdict

    console.print(gate_table(report))
    for line in gate_reasons(report):
        console.print(f"  [red]✗[/red] {line}")
    for note in report.notes:
        console.print(f"note: {note}")
    if report.batch is not None:
        console.print(f"evaluated at {report.batch.describe()}", style="dim")
    console.print(gate_verdict(report))
    if json_path:
        write_text_atomic(json_path, json.dumps(report.to_dict(), indent=2), f"--json {json_path}")


def gate_candidate(evaluator: Evaluator | None, candidate: onnx.ModelProto, eval_args: EvalArgs,
                   out: Console) -> GateReport | None:
    """For `prunec run --data`: gate the result with an Evaluator built before the passes ran
    (so bad data or thresholds fail before any work); print the table. None without --data."""
    if evaluator is None:
        return None
    report = evaluator.compare(candidate, eval_args.thresholds)
    show_gate(report, out)
    return report


def require_data(data_args: DataArgs) -> None:
    """Commands that cannot work without --data say so in one line."""
    if not data_args.path:
        raise OptionError("this command needs --data (an .npz, a CSV of images, or an image folder)")


__all__ = ["DataArgs", "EvalArgs", "CalibArgs", "data_options", "calib_options", "calibration_note",
           "gate_options", "show_gate", "gate_candidate", "require_data", "console", "GateFailure"]
