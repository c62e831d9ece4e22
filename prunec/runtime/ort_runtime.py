"""ONNX Runtime behind the runtime interface, on any execution provider.

Sessions come from `make_session` (no silent CPU fallback). On the TensorRT execution provider
(onnxruntime-gpu), the target's precision maps to TensorRT's provider options (fp16 or int8
engines) and 2:4 sparse tactics are enabled; which layers then run sparse is only visible to
the `tensorrt` runtime (TensorRT's own builder log), not through ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from prunec.errors import RuntimeUnavailableError
from prunec.runtime.opprofile import OpProfile, op_profile
from prunec.runtime.runtimes import ModelLike, Runtime, Session, Shapes
from prunec.runtime.session import make_session, resolve_provider
from prunec.runtime.target import Target


def unavailable_reason() -> str | None:
    """ONNX Runtime is a dependency of prunec: always here."""
    return None


def provider_options(target: Target) -> dict[str, str] | None:
    """Provider options for the target's precision and device, or an error where the provider
    has no such setting."""
    prov = target.provider_short
    prec = target.precision_or_default
    opts: dict[str, str] = {}
    if prov in ("cuda", "tensorrt") and target.device is not None:
        opts["device_id"] = str(target.device)
    if prov == "tensorrt":
        opts["trt_fp16_enable"] = "True" if prec in ("fp16", "int8") else "False"
        opts["trt_int8_enable"] = "True" if prec == "int8" else "False"
        opts["trt_sparsity_enable"] = "True"  # consider 2:4 sparse tactics where weights allow
    elif prec != "fp32":
        raise RuntimeUnavailableError(
            f"--precision {prec} on ONNX Runtime needs the TensorRT provider; ONNX Runtime runs "
            "other providers at the model's own precision (available here: fp32)")
    elif target.device is not None and prov not in ("cuda", "tensorrt"):
        raise RuntimeUnavailableError(f"--device is not an option of ONNX Runtime's {target.provider} provider")
    return opts or None


class OrtSession(Session):
    """An InferenceSession with output names resolved once."""

    def __init__(self, sess: ort.InferenceSession):
        self.sess = sess
        self._inputs = [i.name for i in sess.get_inputs()]
        self._outputs = [o.name for o in sess.get_outputs()]
        self.label = sess.get_providers()[0]

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    def input_batch(self) -> int | None:
        fixed = {i.shape[0] for i in self.sess.get_inputs() if i.shape and isinstance(i.shape[0], int)}
        return fixed.pop() if len(fixed) == 1 else None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.sess.run(self._outputs, feeds)))

    def infer(self, feeds: dict[str, np.ndarray]) -> None:
        self.sess.run(self._outputs, feeds)


class OrtRuntime(Runtime):
    """ONNX Runtime on the target's execution provider."""

    name = "ort"
    static_shapes = False

    def version(self) -> str:
        return ort.__version__

    def devices(self) -> list[str]:
        return list(ort.get_available_providers())

    def check(self, target: Target) -> None:
        resolve_provider(target.provider)  # ProviderError listing the available providers
        provider_options(target)

    def open(self, model: ModelLike, target: Target, *, shapes: Shapes | None = None,
             spin: bool = False) -> OrtSession:
        return OrtSession(make_session(model, provider=target.provider, threads=target.threads, spin=spin,
                                       provider_options=provider_options(target)))

    def op_profile(self, model: ModelLike, feeds: dict[str, np.ndarray], target: Target, *,
                   runs: int = 10, warmup: int = 2, batch: int = 1, top: int = 10,
                   names_from: onnx.ModelProto | None = None) -> OpProfile:
        return op_profile(model, feeds, provider=target.provider, threads=target.threads, runs=runs,
                          warmup=warmup, batch=batch, top=top, provider_options=provider_options(target),
                          names_from=names_from)

    def describe(self, target: Target) -> str:
        return resolve_provider(target.provider)


RUNTIME = OrtRuntime()
