"""ONNX sparse initializers: encoding, decoding, densifying, and sparsity statistics.

ONNX's standard sparse storage (`GraphProto.sparse_initializer`, a `SparseTensorProto`) is COO:
`values` holds the nonzeros and `indices` their positions, either as linear indices `[NNZ]` or
coordinates `[NNZ, rank]`. ONNX has no CSR storage. prunec writes linear indices in ascending
order (the checker requires that), values in the typed field (`float_data` for float32, which
onnx-graphsurgeon reads) and indices in `int64_data`, which protobuf stores as varints: a
linear index below 2**28 takes at most 4 bytes instead of 8, so a float32 weight at 90%
sparsity costs about 0.1 * (4 + 4) / 4 = 0.2x its dense bytes.

The ONNX type system treats a sparse initializer as a *sparse* tensor, so ONNX shape inference
rejects one that feeds a dense op such as MatMul; ONNX Runtime instead turns every sparse
initializer into a dense one when it loads the model. `densified` makes the same conversion so
that structural checks see what the runtime executes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import SparseValues


def to_sparse_proto(name: str, array: np.ndarray) -> onnx.SparseTensorProto:
    """Encode `array` as a SparseTensorProto with sorted linear int64 indices (varint-packed)."""
    a = np.asarray(array)
    flat = a.reshape(-1)
    idx = np.flatnonzero(flat)
    values = onnx.TensorProto()
    values.name = name
    values.data_type = onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
    values.dims.append(int(idx.size))
    field = onnx.helper.tensor_dtype_to_field(values.data_type)
    nz = flat[idx]
    if values.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        getattr(values, field).extend(nz.view(np.uint16).astype(np.int32).tolist())
    else:
        getattr(values, field).extend(nz.tolist())
    indices = onnx.TensorProto()
    indices.name = name + "_indices"
    indices.data_type = onnx.TensorProto.INT64
    indices.dims.append(int(idx.size))
    indices.int64_data.extend(idx.tolist())
    return onnx.helper.make_sparse_tensor(values, indices, list(a.shape))


def from_sparse_proto(sp: onnx.SparseTensorProto) -> np.ndarray:
    """Decode a SparseTensorProto (linear or coordinate indices, raw or typed data) to a dense array."""
    values = numpy_helper.to_array(sp.values).reshape(-1)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    shape = tuple(int(d) for d in sp.dims)
    dense = np.zeros(int(np.prod(shape)) if shape else 1, dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
    dense[indices.reshape(-1)] = values
    return dense.reshape(shape)


class PrunecSparseValues(SparseValues):
    """graphsurgeon's SparseValues with a loader that keeps the dtype and reads any data field."""

    def load(self) -> np.ndarray:
        return from_sparse_proto(self.tensor)


def sparse_constant(name: str, array: np.ndarray) -> gs.Constant:
    """A graph Constant that onnx-graphsurgeon exports as a sparse initializer."""
    return gs.Constant(name, PrunecSparseValues(to_sparse_proto(name, array)))


def is_sparse_constant(t: gs.Tensor) -> bool:
    """True when `t` is a Constant stored as a sparse initializer."""
    return isinstance(t, gs.Constant) and isinstance(t._values, SparseValues)


def adopt_sparse_values(graph: gs.Graph) -> None:
    """Replace graphsurgeon's own SparseValues loaders (float64, typed fields only) with ours."""
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and type(t._values) is SparseValues:
            t._values = PrunecSparseValues(t._values.tensor)


def densified(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every sparse initializer stored dense (as ONNX Runtime loads it)."""
    if not model.graph.sparse_initializer:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for sp in m.graph.sparse_initializer:
        m.graph.initializer.append(numpy_helper.from_array(from_sparse_proto(sp), sp.values.name))
    del m.graph.sparse_initializer[:]
    return m


def sparsity(array: np.ndarray) -> float:
    """Fraction of exact zeros in `array` (0.0 for an empty array)."""
    a = np.asarray(array)
    return float(np.count_nonzero(a == 0)) / a.size if a.size else 0.0
