"""Model inputs: resolving concrete shapes from symbolic ones, and deterministic random feeds.

`--input-shape name=1x3x224x224` fixes an input's shape; otherwise a symbolic first dimension
(the batch) defaults to the requested batch size and any other symbolic dimension is an error
that says which flag to pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from prunec.errors import InputShapeError


@dataclass(frozen=True)
class InputSpec:
    """A graph input as declared: name, numpy dtype, dims (int, or str for symbolic, None for unknown)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of the graph (initializers listed as inputs are left out)."""
    inits = {i.name for i in model.graph.initializer} | {
        s.values.name for s in model.graph.sparse_initializer
    }
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        dims: list[int | str | None] = []
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(d.dim_value)
                elif d.HasField("dim_value"):
                    dims.append("?")  # -1: how PaddlePaddle's exporter writes a dynamic dim
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
        specs.append(InputSpec(vi.name, np.dtype(dtype), tuple(dims)))
    return specs


def parse_input_shapes(items: list[str] | tuple[str, ...] | None) -> dict[str, tuple[int, ...]]:
    """Parse `name=1x3x224x224` strings (also `name:1,3,224,224`) into a dict."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        sep = "=" if "=" in item else (":" if ":" in item else None)
        if sep is None:
            raise InputShapeError(f"--input-shape {item!r}: expected name=1x3x224x224")
        name, _, dims = item.rpartition(sep)
        parts = dims.replace(",", "x").split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise InputShapeError(f"--input-shape {item!r}: dimensions must be integers, "
                                  "e.g. images=1x3x224x224") from None
        if not name or any(s <= 0 for s in shape):
            raise InputShapeError(f"--input-shape {item!r}: need a name and positive dimensions")
        shapes[name] = shape
    return shapes


def resolve_input_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                         *, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every graph input: overrides first, then the batch for a symbolic dim 0."""
    overrides = dict(overrides or {})
    specs = graph_inputs(model)
    names = {s.name for s in specs}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InputShapeError(
            f"--input-shape names unknown input(s) {', '.join(unknown)}; "
            f"the model's inputs are {', '.join(sorted(names)) or '(none)'}"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for s in specs:
        if s.name in overrides:
            shape = overrides[s.name]
            if len(shape) != len(s.dims):
                raise InputShapeError(
                    f"--input-shape {s.name}: rank {len(shape)} given, the model declares rank {len(s.dims)}"
                )
            for i, (given, declared) in enumerate(zip(shape, s.dims)):
                if isinstance(declared, int) and declared != given:
                    raise InputShapeError(
                        f"--input-shape {s.name}: axis {i} is fixed to {declared} in the model, got {given}"
                    )
            shapes[s.name] = tuple(shape)
            continue
        shape = []
        for i, d in enumerate(s.dims):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(batch)
            else:
                label = d if isinstance(d, str) else "?"
                example = "x".join(str(x) if isinstance(x, int) else ("1" if j == 0 else f"<{x or '?'}>")
                                   for j, x in enumerate(s.dims))
                raise InputShapeError(
                    f"input {s.name!r} has a symbolic dimension {label!r} at axis {i}; "
                    f"pass --input-shape {s.name}={example} with numbers for the <...> dims")
        shapes[s.name] = tuple(shape)
    return shapes


def random_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], *, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Deterministic random feeds: standard normal floats, small non-negative ints, random bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in graph_inputs(model):
        shape = shapes[s.name]
        if s.dtype.kind == "f":
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind in "iu":
            # Token ids, indices: small values are valid for any vocabulary.
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise InputShapeError(f"input {s.name!r} has dtype {s.dtype}, which prunec cannot feed")
    return feeds
