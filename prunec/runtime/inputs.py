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
                         *, batch: int = 1, alternate: bool = False) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every graph input: overrides first, then the batch for a symbolic dim 0
    and a representative size for other symbolic dims (see `symbolic_sizes`; `alternate` picks
    the second, smaller one verification also runs)."""
    specs = graph_inputs(model)
    overrides, dims = split_overrides(overrides, specs)
    names = {s.name for s in specs}
    shapes: dict[str, tuple[int, ...]] = {}
    sizes = symbolic_sizes(specs, dims, batch=batch, alternate=alternate)
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
        for i, d in enumerate(s.dims):
            if _unnamed(d) and i > 0:
                # A dim with no name (-1 in Paddle's exports) says nothing about what it is (an
                # image side? a sequence?): prunec does not guess its size.
                example = "x".join(str(x) if isinstance(x, int) else ("1" if j == 0 else f"<{x or '?'}>")
                                   for j, x in enumerate(s.dims))
                raise InputShapeError(
                    f"input {s.name!r} has an unnamed dimension at axis {i}; "
                    f"pass --input-shape {s.name}={example} with numbers for the <...> dims")
        shapes[s.name] = tuple(d if isinstance(d, int) else sizes[_dim_key(s, i)]
                               for i, d in enumerate(s.dims))
    assert set(shapes) == names
    return shapes


# --- symbolic dims other than the batch -----------------------------------------------------

#: Size given to a symbolic dim other than the batch (a sequence length, an image side) that no
#: --input-shape names: analysis and costs use it, verification also runs at half of it, so a
#: length baked into a shape constant by a rewrite fails there.
REPRESENTATIVE_DIM = 128


def split_overrides(overrides: dict[str, tuple[int, ...]] | None, specs: list[InputSpec]
                    ) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """--input-shape values as (per input, per symbolic dim name): `seq=128` names a dim that
    every input declaring `seq` shares, when no input is called `seq`."""
    inputs = {s.name for s in specs}
    dim_names = {d for s in specs for d in s.dims if isinstance(d, str) and not _unnamed(d)}
    per_input, per_dim = {}, {}
    for name, shape in (overrides or {}).items():
        if name in inputs:
            per_input[name] = tuple(shape)
        elif name in dim_names and len(shape) == 1:
            per_dim[name] = int(shape[0])
        else:
            raise InputShapeError(
                f"--input-shape names unknown input(s) {name}; the model's inputs are "
                f"{', '.join(sorted(inputs)) or '(none)'}"
                + (f" and its symbolic dims {', '.join(sorted(dim_names))} (e.g. {sorted(dim_names)[0]}=128)"
                   if dim_names else ""))
    return per_input, per_dim


def _unnamed(d) -> bool:
    """A dim without a name: unknown, or Paddle's -1 (read as "?")."""
    return d is None or d in ("", "?")


def _dim_key(spec: InputSpec, axis: int) -> str:
    d = spec.dims[axis]
    return f"{spec.name}:{axis}" if _unnamed(d) else d


def symbolic_sizes(specs: list[InputSpec], given: dict[str, int] | None = None, *, batch: int = 1,
                   alternate: bool = False) -> dict[str, int]:
    """A size for every symbolic dim (by name; unnamed ones as `input:axis`).

    A dim named at axis 0 of any input is the batch. A name given with --input-shape NAME=N keeps
    N; other names get `REPRESENTATIVE_DIM`; `alternate` halves both. (Unnamed dims get a size
    here too, but `resolve_input_shapes` asks for them instead.) A name that is an
    expression of other names (`past_sequence_length + sequence_length`, `s0 + 1`) is computed
    from theirs, so inputs that must agree do."""
    given = given or {}
    batch_names = {s.dims[0] for s in specs if s.dims and isinstance(s.dims[0], str) and not _unnamed(s.dims[0])}
    keys = {_dim_key(s, i): i for s in specs for i, d in enumerate(s.dims) if not isinstance(d, int)}

    def base(name: str) -> int:
        if name in given:
            n = given[name]
        elif name in batch_names:
            return batch
        else:
            n = REPRESENTATIVE_DIM
        return max(1, n // 2) if alternate else n

    sizes = {}
    for key, axis in keys.items():
        if key in given or key in batch_names:
            sizes[key] = base(key)
            continue
        if ":" not in key or not key.rsplit(":", 1)[1].isdigit():
            value = _evaluate(key, base)
            if value is not None:
                sizes[key] = value
                continue
        sizes[key] = batch if axis == 0 else base(key)
    return sizes


def _evaluate(expr: str, size_of) -> int | None:
    """The value of a dim expression (+, -, *, // over names and integers), or None when `expr`
    is a plain name or not such an expression."""
    import ast

    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    if isinstance(tree, ast.Name):
        return None

    def ev(node) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return size_of(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)):
            a, b = ev(node.left), ev(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b,
                    ast.FloorDiv: a // b if b else 0}[type(node.op)]
        raise ValueError(expr)

    try:
        value = ev(tree)
    except (ValueError, RecursionError):
        return None
    return value if value > 0 else None


def sized_dims_note(chosen: dict[str, int], *, verification: bool = False) -> str:
    """One line saying which sizes prunec gave symbolic dims, and how to set them."""
    dims = ", ".join(f"{k}={v}" for k, v in chosen.items())
    also = ", ".join(f"{k}={max(1, v // 2)}" for k, v in chosen.items())
    return (f"symbolic dims sized by prunec: {dims}" + (f" (verification also at batch 2, {also})"
                                                        if verification else "")
            + f"; set them with --input-shape {next(iter(chosen))}=N")


def chosen_sizes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None
                 ) -> dict[str, int]:
    """The symbolic dims (other than the batch) that prunec sized itself, with their sizes: what
    a command says it ran at. Dims of inputs given whole with --input-shape are left out."""
    specs = graph_inputs(model)
    per_input, per_dim = split_overrides(overrides, specs)
    batch_names = {s.dims[0] for s in specs if s.dims and isinstance(s.dims[0], str) and not _unnamed(s.dims[0])}
    sizes = symbolic_sizes(specs, per_dim)
    out = {}
    for s in specs:
        if s.name in per_input:
            continue
        for i, d in enumerate(s.dims):
            key = _dim_key(s, i)
            if not isinstance(d, int) and i > 0 and key not in batch_names and key not in per_dim:
                out[key] = sizes[key]
    return out


def random_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], *, seed: int = 0,
                  feeds: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Deterministic random feeds: standard normal floats, small non-negative ints, random bools.

    Inputs with a fixed value (`feeds`, from --feed, else a value the model names itself, see
    `model_named_values`) get that value, broadcast to their shape."""
    rng = np.random.default_rng(seed)
    fixed = fixed_values(model, feeds)
    out = {}
    for s in graph_inputs(model):
        shape = shapes[s.name]
        if s.name in fixed:
            out[s.name] = broadcast_feed(s.name, _cast(s.name, fixed[s.name], s.dtype), shape)
        elif s.dtype.kind == "f":
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind in "iu":
            # Token ids, indices: small values are valid for any vocabulary.
            out[s.name] = rng.integers(0, 2, size=shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            out[s.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise InputShapeError(f"input {s.name!r} has dtype {s.dtype}, which prunec cannot feed; "
                                  f"give its value with --feed {s.name}=file.npy")
    return out


# --- fixed input values: --feed, and values the model names itself -------------------------

def parse_feeds(items: list[str] | tuple[str, ...] | None) -> dict[str, np.ndarray]:
    """`name=16000`, `name=0.5,1,2` (a 1-D array) or `name=file.npy` -> {name: array}."""
    feeds: dict[str, np.ndarray] = {}
    for item in items or ():
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name or not value:
            raise InputShapeError(f"--feed {item!r}: expected NAME=VALUE or NAME=file.npy, e.g. sr=16000")
        if value.lower().endswith(".npy"):
            try:
                feeds[name] = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputShapeError(f"--feed {item!r}: cannot read {value}: {exc}") from None
            continue
        try:
            numbers = [float(v) for v in value.split(",")]
        except ValueError:
            raise InputShapeError(f"--feed {item!r}: {value!r} is neither a number, a comma list of "
                                  "numbers, nor a .npy file") from None
        arr = np.array(numbers if "," in value else numbers[0])
        feeds[name] = arr.astype(np.int64) if np.all(arr == np.round(arr)) and "." not in value else arr
    return feeds


def sample_batches(model: onnx.ModelProto, arrays: dict[str, np.ndarray], *, limit: int = 64,
                   batch: int = 16) -> list[dict[str, np.ndarray]]:
    """Feeds from sample arrays (samples on axis 0, named after the inputs): the first `limit`
    samples, cut into batches of `batch`, or of the model's batch size where it is fixed; each
    array cast to its input's dtype. Inputs without an array make this return []."""
    specs = graph_inputs(model)
    if not specs or any(s.name not in arrays or not s.dims for s in specs):
        return []
    n = min(min(len(arrays[s.name]) for s in specs), limit)
    fixed = {s.dims[0] for s in specs if isinstance(s.dims[0], int)}
    if len(fixed) > 1:
        return []
    step = batch
    if fixed:
        step = fixed.pop()
        n -= n % step  # whole batches only
    return [{s.name: np.asarray(arrays[s.name][i:i + step]).astype(s.dtype, copy=False) for s in specs}
            for i in range(0, n, step)]


def check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Every --feed names an input of the model and fits its dtype and declared dims."""
    specs = {s.name: s for s in graph_inputs(model)}
    unknown = sorted(set(feeds) - set(specs))
    if unknown:
        raise InputShapeError(f"--feed names unknown input(s) {', '.join(unknown)}; "
                              f"the model's inputs are {', '.join(sorted(specs)) or '(none)'}")
    for name, value in feeds.items():
        s = specs[name]
        _cast(name, value, s.dtype)
        if value.ndim > len(s.dims):
            raise InputShapeError(f"--feed {name}: a value of rank {value.ndim} for an input of rank "
                                  f"{len(s.dims)}")


def model_named_values(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, str]]:
    """Values the model itself names for single-value inputs, with where they come from.

    Two sources: a `metadata_props` entry named after the input (`sr` = `16000`; the first of a
    comma list), and a constant the graph compares the input with in an Equal node (silero-vad
    checks `sr == 16000`, and fails for anything else). Random values fail such models."""
    specs = {s.name: s for s in graph_inputs(model)
             if all(d == 1 for d in s.dims) and s.dtype.kind in "iuf"}
    if not specs:
        return {}
    found: dict[str, tuple[np.ndarray, str]] = {}
    for prop in model.metadata_props:
        if prop.key in specs:
            try:
                value = np.array(float(prop.value.split(",")[0]))
            except ValueError:
                continue
            found[prop.key] = (value, f"the model's metadata {prop.key}={prop.value}")
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value"})
    for n in model.graph.node:
        if n.op_type != "Equal" or len(n.input) != 2:
            continue
        for mine, other in (n.input, reversed(n.input)):
            if mine in specs and mine not in found and other in constants:
                value = onnx.numpy_helper.to_array(constants[other])
                if value.size == 1:
                    found[mine] = (value.reshape(()), f"the model compares it with {value.item()!r}")
    return found


def fixed_values(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """Inputs with a fixed value: `feeds` (from --feed) over the values the model names itself."""
    return {**{k: v for k, (v, _) in model_named_values(model).items()}, **(feeds or {})}


def broadcast_feed(name: str, value: np.ndarray, shape: tuple[int, ...], dtype=None) -> np.ndarray:
    """`value` broadcast to `shape` (e.g. a [2,1,128] state to batch 2), as a fresh array."""
    value = np.asarray(value)
    try:
        out = np.broadcast_to(value, shape)
    except ValueError:
        raise InputShapeError(f"--feed {name}: a value of shape {list(value.shape)} does not fit the "
                              f"input's shape {list(shape)}") from None
    return np.array(out, dtype=dtype) if dtype is not None else np.array(out)


def _cast(name: str, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iub" and value.dtype.kind == "f" and not np.all(value == np.round(value)):
        raise InputShapeError(f"--feed {name}: input {name!r} holds {dtype} values, got {value.dtype}")
    try:
        return value.astype(dtype)
    except (TypeError, ValueError):
        raise InputShapeError(f"--feed {name}: cannot use a {value.dtype} value for a {dtype} input") from None


def typed_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Fixed values (feeds over model-named ones) cast to their inputs' dtypes."""
    specs = {s.name: s for s in graph_inputs(model)}
    return {k: _cast(k, v, specs[k].dtype) for k, v in fixed_values(model, feeds).items() if k in specs}
