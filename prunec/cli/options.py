"""Option groups shared by every command, defined once so a flag means the same everywhere."""

from __future__ import annotations

import functools

import click

from prunec.runtime.inputs import parse_feeds, parse_input_shapes
from prunec.runtime.target import PRECISIONS, RUNTIMES, Target


def _compose(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


def input_shape_options(f):
    """--input-shape name=1x3x224x224 (repeatable), parsed into `input_shapes`."""

    @click.option("--input-shape", "input_shape", multiple=True, metavar="NAME=DIMS",
                  help="Concrete shape for an input with symbolic dims, e.g. images=1x3x224x224. "
                       "Repeatable. A symbolic batch defaults to 1.")
    @functools.wraps(f)
    def wrapper(*args, input_shape, **kwargs):
        return f(*args, input_shapes=parse_input_shapes(input_shape), **kwargs)

    return wrapper


def feed_option(f):
    """--feed name=VALUE|file.npy (repeatable), parsed into `feeds`: fixed values for inputs."""

    @click.option("--feed", "feed", multiple=True, metavar="NAME=VALUE|FILE.npy",
                  help="Fixed value for an input wherever prunec runs the model (verification, "
                       "profiling, the gate), e.g. sr=16000 or state=state.npy (broadcast to the "
                       "input's shape). Repeatable. Default: random values, or a value the model "
                       "names itself (metadata, or a constant it compares the input with).")
    @functools.wraps(f)
    def wrapper(*args, feed, **kwargs):
        return f(*args, feeds=parse_feeds(feed), **kwargs)

    return wrapper


def json_option(help_text: str, *, stdout: bool = False):
    """--json PATH, the same on every command: write the command's JSON document to PATH.

    With `stdout`, `--json -` (or a bare --json at the end) prints it instead of the tables."""
    if stdout:
        return click.option("--json", "json_path", default=None, is_flag=False, flag_value="-",
                            type=click.Path(path_type=str), metavar="PATH",
                            help=help_text + " `-` (or --json last, alone) prints it instead of the tables.")
    return click.option("--json", "json_path", default=None, type=click.Path(path_type=str), metavar="PATH",
                        help=help_text)


class BatchSize(click.ParamType):
    """`auto` or a positive integer."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).strip().lower() == "auto":
            return value if isinstance(value, int) else "auto"
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r}: expected auto or a positive number of samples", param, ctx)
        return n


#: --batch-size for every command that evaluates models on data.
batch_size_option = click.option(
    "--batch-size", type=BatchSize(), default="auto", show_default=True,
    help="Evaluation batch size, or auto: the fastest per sample of 1, 2, 4 ... 64, measured once on "
         "the first samples with the original model (ONNX Runtime; other runtimes use 64).")


def metric_option(f):
    """--metric module:function or file.py:function, loaded into `metric` (a TaskMetric or None)."""

    @click.option("--metric", "metric_spec", default=None, metavar="MODULE:FUNC|FILE.py:FUNC",
                  help="Your task metric: fn(outputs: dict of arrays, targets) -> per-sample scores in "
                       "[0, 1] (docs/task-metrics.md). Default: top-1 with labels, else agreement, "
                       "else output cosine.")
    @functools.wraps(f)
    def wrapper(*args, metric_spec, **kwargs):
        from prunec.eval.task_metric import load_metric

        return f(*args, metric=load_metric(metric_spec) if metric_spec else None, **kwargs)

    return wrapper


def announce_fixed(console, model, feeds) -> None:
    """Say which inputs get a value the model names itself (not overridden by --feed)."""
    from prunec.runtime.inputs import check_feeds, model_named_values

    check_feeds(model, feeds)
    for name, (value, why) in model_named_values(model).items():
        if name not in feeds:
            console.print(f"note: input {name!r} is fed {value.item()!r} ({why}); "
                          f"--feed {name}=VALUE sets another", highlight=False)


model_argument = click.argument("model", type=click.Path(path_type=str))

def runtime_options(f):
    """--runtime, --provider, --device, --precision, --threads, collapsed into `target` (a
    prunec.runtime.target.Target). A combination a runtime does not have is a one-line error."""

    @click.option("--runtime", type=click.Choice(RUNTIMES), default="ort", show_default=True,
                  help="Runtime to measure on: ONNX Runtime, OpenVINO (pip install 'prunec[openvino]') or "
                       "TensorRT (tensorrt package and a CUDA GPU).")
    @click.option("--provider", default="cpu", show_default=True,
                  help="ONNX Runtime execution provider: cpu, cuda, tensorrt, openvino, ... "
                       "(no silent fallback). --runtime ort only.")
    @click.option("--device", default=None,
                  help="OpenVINO device (CPU, GPU, NPU, AUTO; default CPU) or TensorRT CUDA device index "
                       "(default 0); ORT's CUDA/TensorRT providers take a device id.")
    @click.option("--precision", default=None, type=click.Choice(sorted({p for v in PRECISIONS.values() for p in v})),
                  help="ort: fp32 (fp16/int8 only on its TensorRT provider); openvino: fp32 (default), bf16, "
                       "fp16; tensorrt: fp16 (default), fp32, int8 (uncalibrated: timing only).")
    @click.option("--threads", type=int, default=None,
                  help="Intra-op threads for the CPU runtime (default: runtime's choice).")
    @functools.wraps(f)
    def wrapper(*args, runtime: str, provider: str, device: str | None, precision: str | None,
                threads: int | None, **kwargs):
        target = Target(runtime=runtime, provider=provider, device=device, precision=precision, threads=threads)
        return f(*args, target=target, **kwargs)

    return wrapper


def _parse_batches(ctx, param, value: str | None) -> tuple[int, ...]:
    if value is None:
        return ()
    try:
        batches = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected batch sizes like 1,8,32") from None
    if not batches or any(b < 1 for b in batches):
        raise click.BadParameter(f"{value!r}: batch sizes must be positive integers")
    return tuple(dict.fromkeys(batches))


def batch_option(default: str = "1"):
    """--batch 1,8,32: batch sizes to measure at (a symbolic first input dim takes each)."""
    return click.option("--batch", "batches", default=default, show_default=True, metavar="B1,B2,...",
                        callback=_parse_batches,
                        help="Batch sizes, comma-separated; each fills a symbolic batch dimension.")
