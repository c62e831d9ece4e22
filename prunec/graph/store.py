"""Where a run's models live outside Python: one temp folder of small .onnx files whose weights
point into one data file, each weight array written once.

Everything outside Python needs a model as bytes: the ONNX checker, shape inference, ONNX Runtime,
the proof's reference, the output file. Serializing a whole model for each of them (19 times in one
three-pass run of a 90 MiB model, before this module) costs seconds and a copy of every weight each
time. Instead `Store.export` writes each pass's result once: a *skeleton* (the model with every
large weight replaced by an external-data reference) and, into the store's data file, the bytes of
the weights no earlier export wrote. Then the checker reads the skeleton by path (any size; the
2 GB protobuf limit never applies), shape inference runs on the skeleton in memory, ONNX Runtime
opens the path and maps the weights, and `write_model` streams the result into the output file.

A weight array is written once per run: an export refers to the bytes already written for every
array it shares with an earlier export (the masked reference shares most of the original's, a pass
that changes nothing shares all). This relies on arrays never being edited in place once exported
(passes replace arrays; `materialize_weights`' casts and `_zero_slices` copy), and the store makes
every array it writes read-only, so an in-place edit raises instead of silently diverging.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from prunec.counters import count

#: Tensors at least this large are written to the data file; smaller ones stay in the skeleton.
EXTERNAL_MIN_BYTES = 1024
#: Element types written to the data file: weights. Integer tensors wider than 8 bits stay in the
#: skeleton because shape inference reads their values (Reshape targets, Gather indices, pads).
EXTERNAL_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                  onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                  *(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
                                                          "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
                    if hasattr(onnx.TensorProto, n))}
#: numpy dtypes a weight array may have: their bytes are the tensor's raw data as they are.
_PLAIN_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.uint8)}
#: Offsets in data files are multiples of this (the page size), so ONNX Runtime can map them.
_ALIGN = 4096


@dataclass(frozen=True)
class WeightRef:
    """Where one tensor's bytes are: a file in the store folder, an offset, a length."""

    file: str
    offset: int
    length: int


class Store:
    """A run-scoped temp folder for exported models (see the module docstring).

    `parent` is where the folder goes (the output model's folder keeps big temp data on the disk
    the output goes to; default: the system temp folder). A write that fails (a full disk) raises
    `error(f"{label}: cannot write: ...")` when a label is given, else the OSError. Use as a
    context manager, or `close()`."""

    DATA = "weights.bin"

    def __init__(self, parent: str | os.PathLike | None = None, *, label: str | None = None,
                 error: type[Exception] | None = None):
        self.label, self.error = label, error
        with self._errors():
            self.dir = Path(tempfile.mkdtemp(prefix=".prunec-run-", dir=parent))
            self._data = open(self.dir / self.DATA, "wb")  # noqa: SIM115 (open for the run; closed by close())
        self._written: dict[int, tuple[weakref.ref, WeightRef]] = {}
        self._exports = 0

    def close(self) -> None:
        """Remove the folder and everything in it."""
        try:
            self._data.close()
        except OSError:
            pass  # a full disk fails the final flush too; the folder goes anyway
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextmanager
    def _errors(self):
        try:
            yield
        except OSError as exc:
            if self.error is None or self.label is None:
                raise
            raise self.error(f"{self.label}: cannot write: {exc.strerror or exc}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- weights

    def _ref(self, holder) -> WeightRef | None:
        hit = self._written.get(id(holder))
        return hit[1] if hit is not None and hit[0]() is holder else None

    def _remember(self, holder, ref: WeightRef) -> None:
        key = id(holder)
        self._written[key] = (weakref.ref(holder, lambda _, k=key: self._written.pop(k, None)), ref)

    def _append(self, buffer) -> WeightRef:
        f = self._data
        with self._errors():
            pad = -f.tell() % _ALIGN
            if pad:
                f.write(b"\0" * pad)
            offset = f.tell()
            f.write(buffer)
            return WeightRef(self.DATA, offset, f.tell() - offset)

    def put_array(self, a: np.ndarray) -> WeightRef:
        """The bytes of `a` in the data file (written now unless this very array already was);
        `a` (and any array it is a view of) becomes read-only."""
        ref = self._ref(a)
        if ref is not None:
            return ref
        freeze(a)
        data = np.ascontiguousarray(a)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        ref = self._append(memoryview(data).cast("B"))
        count("weights_written", ref.length)
        self._remember(a, ref)
        return ref

    def put_proto(self, lazy: LazyValues) -> WeightRef:
        """The raw bytes of a tensor graphsurgeon keeps as a protobuf (types numpy lacks: bfloat16,
        float8, int4), written once."""
        ref = self._ref(lazy)
        if ref is None:
            ref = self._append(lazy.tensor.raw_data)
            count("weights_written", ref.length)
            self._remember(lazy, ref)
        return ref

    def flush(self) -> None:
        """Make everything written so far visible to readers of the data file."""
        with self._errors():
            self._data.flush()

    # -- models

    def export(self, graph: gs.Graph, template: onnx.ModelProto, name: str) -> ModelFile:
        """Write `graph` (with the template's model-level fields, see `prunec.graph.ir.to_onnx`) as
        `NN-name.onnx` in the store: its large weights become references into the data file."""
        from prunec.graph.ir import to_onnx

        swapped = []
        try:
            for t in graph.tensors().values():
                stub = self._stub(t) if isinstance(t, gs.Constant) else None
                if stub is not None:
                    swapped.append((t, t._values))
                    t._values = LazyValues(stub)
            model = to_onnx(graph, template)
        finally:
            for t, values in swapped:
                t._values = values
        self.flush()
        return self.add(model, name)

    def add(self, skeleton: onnx.ModelProto, name: str) -> ModelFile:
        """Write a skeleton whose external data is already in this store (a variant of an exported
        model, e.g. with more outputs) as `NN-name.onnx`."""
        self._exports += 1
        path = self.dir / f"{self._exports:02d}-{name}.onnx"
        with self._errors():
            path.write_bytes(skeleton.SerializeToString())
        return ModelFile(path, skeleton, self)

    def _stub(self, t: gs.Constant) -> onnx.TensorProto | None:
        """An external-data TensorProto for `t` if it belongs in the data file, else None."""
        values = t._values
        if isinstance(values, SparseValues):
            return None
        if isinstance(values, LazyValues):
            tp = values.tensor
            if tp.data_type not in EXTERNAL_TYPES or not tp.HasField("raw_data") \
                    or values.nbytes < EXTERNAL_MIN_BYTES:
                return None
            ref, data_type, dims = self.put_proto(values), tp.data_type, list(tp.dims)
        else:
            a = values if isinstance(values, np.ndarray) else None
            if a is None or a.dtype not in _PLAIN_DTYPES or a.nbytes < EXTERNAL_MIN_BYTES \
                    or (t.export_dtype is not None and np.dtype(t.export_dtype) != a.dtype):
                return None
            ref, data_type, dims = self.put_array(a), onnx.helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)
        stub = onnx.TensorProto(name=t.name, data_type=data_type, dims=dims)
        set_external(stub, ref)
        return stub


def strip(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its weight data: the tensors `Store.export` would write to the
    data file keep their name, type and dims, marked external (with no file). For what needs a
    model's structure but not its weights (interface, precision, shape inference)."""
    out = onnx.ModelProto()
    graph = model.graph
    inits = list(graph.initializer)
    for field, value in model.ListFields():
        if field.name != "graph":
            out.MergeFrom(onnx.ModelProto(**{field.name: value}))
    g = out.graph
    for field, value in graph.ListFields():
        if field.name != "initializer":
            g.MergeFrom(onnx.GraphProto(**{field.name: value}))
    for t in inits:
        # A weight still in its file (a lazily opened input) is left there too.
        external = t.data_location == onnx.TensorProto.EXTERNAL
        if external:
            n = int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            n = len(t.raw_data) if t.HasField("raw_data") else 0
        if external or (t.data_type in EXTERNAL_TYPES and n >= EXTERNAL_MIN_BYTES):
            stub = g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            set_external(stub, WeightRef("", 0, n))
        else:
            g.initializer.append(t)
    return out


def set_external(t: onnx.TensorProto, ref: WeightRef) -> None:
    """Point `t` at `ref` (location, offset, length) as ONNX external data."""
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", ref.file), ("offset", str(ref.offset)), ("length", str(ref.length))):
        t.external_data.add(key=key, value=value)


def external_ref(t: onnx.TensorProto) -> WeightRef | None:
    """Where an external-data tensor's bytes are, or None for a tensor with its data inline."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return WeightRef(info["location"], int(info.get("offset", 0)), int(info["length"]))


def freeze(a: np.ndarray) -> None:
    """Make `a`, and every array it is a view of, read-only."""
    while isinstance(a, np.ndarray):
        a.flags.writeable = False
        a = a.base


@dataclass
class ModelFile:
    """One model in a store: `path` (the skeleton on disk, loadable by ONNX Runtime and the checker
    with its external data) and `skeleton` (the same proto in memory, without weight data)."""

    path: Path
    skeleton: onnx.ModelProto
    store: Store

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights the model refers to in the data file."""
        return sum(r.length for r in self.refs().values())

    def refs(self) -> dict[str, WeightRef]:
        """External weights by tensor name."""
        out = {}
        for t in self.skeleton.graph.initializer:
            ref = external_ref(t)
            if ref is not None:
                out[t.name] = ref
        return out

    def read(self, name: str) -> np.ndarray:
        """The values of initializer `name` (read from the data file when external)."""
        from onnx import numpy_helper

        t = next(t for t in self.skeleton.graph.initializer if t.name == name)
        ref = external_ref(t)
        if ref is None:
            return numpy_helper.to_array(t)
        full = onnx.TensorProto()
        full.CopyFrom(t)
        full.ClearField("data_location")
        del full.external_data[:]
        with open(self.store.dir / ref.file, "rb") as f:
            f.seek(ref.offset)
            full.raw_data = f.read(ref.length)
        return numpy_helper.to_array(full)

    def load(self) -> onnx.ModelProto:
        """The whole model as one protobuf, weights included (a full copy: for callers that need
        a ModelProto; prunec's own steps use the path or the skeleton)."""
        from onnx.external_data_helper import load_external_data_for_model

        count("materialize")
        model = onnx.ModelProto()
        model.CopyFrom(self.skeleton)
        load_external_data_for_model(model, str(self.store.dir))
        return model


# ----------------------------------------------------------------------------------------------
# Writing a model out of the store


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_prefix(number: int, length: int) -> bytes:
    """The tag and length prefix of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


#: Field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def write_single_file(mf: ModelFile, f) -> int:
    """Stream `mf` into the open binary file `f` as one self-contained .onnx protobuf (weights
    inline), copying each weight from the data file without holding the model in memory.
    Returns the bytes written.

    The encoding is one ordinary ModelProto: the fields other than `graph`, then the graph, whose
    initializers come after its other fields (protobuf parsers accept fields in any order)."""
    model = onnx.ModelProto()
    model.CopyFrom(mf.skeleton)
    graph = model.graph
    inits = list(graph.initializer)
    del graph.initializer[:]
    head = graph.SerializeToString()
    model.ClearField("graph")
    parts = []  # (bytes before the payload, WeightRef or None)
    for t in inits:
        ref = external_ref(t)
        if ref is None:
            body = t.SerializeToString()
            parts.append((field_prefix(_GRAPH_INITIALIZER, len(body)) + body, None))
            continue
        meta = onnx.TensorProto()
        meta.CopyFrom(t)
        meta.ClearField("data_location")
        del meta.external_data[:]
        body = meta.SerializeToString() + field_prefix(_TENSOR_RAW_DATA, ref.length)
        parts.append((field_prefix(_GRAPH_INITIALIZER, len(body) + ref.length) + body, ref))
    graph_len = len(head) + sum(len(p) + (r.length if r else 0) for p, r in parts)
    start = f.tell()
    f.write(model.SerializeToString())
    f.write(field_prefix(_MODEL_GRAPH, graph_len))
    f.write(head)
    with open(mf.store.dir / mf.store.DATA, "rb") as src:
        for prefix, ref in parts:
            f.write(prefix)
            if ref is not None:
                copy_range(src, f, ref.offset, ref.length)
    return f.tell() - start


def write_external(mf: ModelFile, f_model, f_data, data_name: str) -> None:
    """Stream `mf` as an .onnx file (`f_model`) whose weights go into `f_data`, which the model
    names `data_name` (a file beside it)."""
    model = onnx.ModelProto()
    model.CopyFrom(mf.skeleton)
    with open(mf.store.dir / mf.store.DATA, "rb") as src:
        for t in model.graph.initializer:
            ref = external_ref(t)
            if ref is None:
                continue
            pad = -f_data.tell() % _ALIGN
            if pad:
                f_data.write(b"\0" * pad)
            offset = f_data.tell()
            copy_range(src, f_data, ref.offset, ref.length)
            set_external(t, WeightRef(data_name, offset, ref.length))
    f_model.write(model.SerializeToString())


def copy_range(src, dst, offset: int, length: int, chunk: int = 16 * 2**20) -> None:
    """Copy `length` bytes at `offset` of file `src` to the current position of `dst`, in chunks
    (the kernel copies them when it can)."""
    dst.flush()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, offset + done)
                if n <= 0:
                    break
                done += n
        except OSError:
            pass
        if done:
            dst.seek(0, os.SEEK_END)  # the kernel moved the file, not our position
    src.seek(offset + done)
    while done < length:
        block = src.read(min(chunk, length - done))
        if not block:
            raise OSError(f"data file ends {length - done} bytes early")
        dst.write(block)
        done += len(block)
