"""ONNX Runtime sessions built one way everywhere: provider checks, thread counts, big models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from prunec.errors import ProviderError

#: Short names users type, mapped to ONNX Runtime provider names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "qnn": "QNNExecutionProvider",
}

_SERIALIZE_LIMIT = 2**31 - 64 * 2**20


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    # pybind11 turns other C++ exceptions into RuntimeError.
    return own + (RuntimeError,)


#: What ONNX Runtime raises when it rejects a model or its inputs (its own C++ error types, and
#: RuntimeError). Catch these, not Exception: anything else escaping a session is a bug in prunec.
ORT_ERRORS = _ort_errors()

# ONNX Runtime's default logger prints optimizer warnings (also for sessions that
# onnx-graphsurgeon opens while folding constants) and, at error level, multi-line kernel
# failures that the raised exception repeats; prunec reports problems itself, in one line.
ort.set_default_logger_severity(4)


def resolve_provider(name: str) -> str:
    """Map `cpu`/`cuda`/... or a full provider name to one that this ONNX Runtime build has."""
    full = PROVIDER_ALIASES.get(name.lower(), name)
    available = ort.get_available_providers()
    if full not in available:
        raise ProviderError(
            f"execution provider {name!r} is not available in this onnxruntime build; "
            f"available: {', '.join(available)}"
        )
    return full


def make_session(model: onnx.ModelProto | str | os.PathLike, *, provider: str = "cpu",
                 threads: int | None = None, optimization: str = "all",
                 spin: bool | None = None, profile_prefix: str | None = None,
                 custom_op_libraries: tuple[str, ...] = (),
                 provider_options: dict[str, str] | None = None,
                 ) -> ort.InferenceSession:
    """Create an InferenceSession on exactly the requested provider (no silent CPU fallback).

    Custom-op libraries are registered when given, and prunec's own opt-in sparse op library
    whenever the model uses it (a file is only inspected if ONNX Runtime rejects the op).
    `provider_options` go to the requested provider (e.g. TensorRT's `trt_fp16_enable`).
    """
    full = resolve_provider(provider)
    name = provider
    so = ort.SessionOptions()
    libraries = list(custom_op_libraries)
    if isinstance(model, onnx.ModelProto):
        from prunec.runtime import sparse_ops

        if sparse_ops.uses_custom_ops(model):
            if not sparse_ops.available():
                raise ProviderError("this model uses prunec's sparse custom op "
                                    f"({sparse_ops.DOMAIN}::{sparse_ops.OP_TYPE}); "
                                    "pip install onnxruntime-extensions to run it")
            libraries.append(sparse_ops.library_path())
    for lib in dict.fromkeys(libraries):
        so.register_custom_ops_library(lib)
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if spin is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers: list = [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]
    if provider_options:
        providers[0] = (full, dict(provider_options))
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() < _SERIALIZE_LIMIT:
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        else:
            with tempfile.TemporaryDirectory(prefix="prunec-") as d:
                path = Path(d) / "model.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True,
                                all_tensors_to_one_file=True, location="model.onnx.data")
                sess = ort.InferenceSession(str(path), so, providers=providers)
    else:
        try:
            sess = ort.InferenceSession(str(model), so, providers=providers)
        except ORT_ERRORS as exc:
            from prunec.runtime import sparse_ops

            if sparse_ops.OP_TYPE not in str(exc) or libraries:
                raise
            return make_session(onnx.load(str(model)), provider=provider, threads=threads,
                                optimization=optimization, spin=spin, profile_prefix=profile_prefix,
                                provider_options=provider_options)
    # ORT drops a provider whose libraries fail to load (e.g. CUDA without cuDNN) with only a
    # log line, and the session would quietly run on CPU; refuse that.
    if full not in sess.get_providers():
        raise ProviderError(f"execution provider {name!r} is listed by onnxruntime but failed to "
                            f"initialise (missing libraries or device?); session got "
                            f"{', '.join(sess.get_providers())}")
    return sess


def run_session(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run and return outputs by name."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def is_ort_error(exc: BaseException) -> bool:
    """True for ONNX Runtime's own exception types (raised from C++ when a model cannot run)."""
    return type(exc).__module__.startswith("onnxruntime")


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (ORT's can be long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
