"""An opt-in CPU sparse kernel for ONNX Runtime: CSR x dense on scipy.sparse, as a Python custom op.

Stock ONNX Runtime has no sparse kernel a self-contained model can use: it densifies sparse
initializers at load, and its com.microsoft SparseToDenseMatMul only accepts a sparse tensor
bound as a graph input at run time. This op (`ai.onnx.contrib::PrunecCsrMatMul`) runs through
onnxruntime-extensions' PyOp bridge: Y[..., N] = X[..., K] @ W[K, N] with W^T stored as CSR in
three dense initializers (data float32 [nnz], indices int32 [nnz], indptr int32 [N+1]).
The bridge copies inputs into numpy and returns outputs through Python lists on every call,
so the op only pays off where the product itself is small (batch 1, high sparsity); the `csr`
pass measures it per layer and keeps the dense layer wherever it does not win.
"""

from __future__ import annotations

import functools

import numpy as np

DOMAIN = "ai.onnx.contrib"
OP_TYPE = "PrunecCsrMatMul"

_matrices: dict[str, object] = {}


def available() -> bool:
    """True when onnxruntime-extensions (the PyOp bridge) is installed."""
    try:
        import onnxruntime_extensions  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def library_path() -> str:
    """Register the op with the PyOp bridge (once) and return the custom-op library to load."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    @onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float,
                                      PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int32],
             outputs=[PyCustomOpDef.dt_float], attrs={"key": PyCustomOpDef.dt_string})
    def _csr_matmul(x, data, indices, indptr, key=""):
        return csr_matmul(x, data, indices, indptr, key)

    return get_library_path()


def csr_matmul(x: np.ndarray, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
               key: str = "") -> np.ndarray:
    """X[..., K] @ W[K, N] where (data, indices, indptr) is W^T [N, K] in CSR."""
    import scipy.sparse as sp

    # The bridge hands over fresh copies every call; building the matrix once per content key
    # (a hash written by the pass) saves scipy's format checks.
    m = _matrices.get(key) if key else None
    if m is None or m.nnz != data.size:
        m = sp.csr_matrix((data, indices, indptr), shape=(indptr.size - 1, x.shape[-1]))
        if key:
            _matrices[key] = m
    x2 = x.reshape(-1, x.shape[-1])
    y = np.asarray(m @ x2.T, dtype=np.float32).T
    return np.ascontiguousarray(y).reshape(x.shape[:-1] + (m.shape[0],))


def uses_custom_ops(model) -> bool:
    """True when a ModelProto has a node in this op's domain."""
    return any(n.domain == DOMAIN for n in model.graph.node)
