"""Option groups shared by every command, defined once so a flag means the same everywhere."""

from __future__ import annotations

import functools

import click

from prunec.runtime.inputs import parse_input_shapes


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


model_argument = click.argument("model", type=click.Path(path_type=str))

runtime_options = _compose(
    click.option("--provider", default="cpu", show_default=True,
                 help="ONNX Runtime execution provider: cpu, cuda, tensorrt, openvino, ... "
                      "(no silent fallback)."),
    click.option("--threads", type=int, default=None,
                 help="Intra-op threads for ONNX Runtime (default: runtime's choice)."),
)


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
