"""OpenVINO behind the runtime interface (optional: `pip install 'prunec[openvino]'`).

OpenVINO reads ONNX directly. A session is a model compiled for one device, reshaped to fixed
input shapes when they are given (the profiler does, per batch size: a dynamic-shape compile
runs slower and would not be what a deployment measures). Precision is pinned (`f32` unless
`--precision bf16|fp16`): OpenVINO's CPU default is bf16 on CPUs with bf16 instructions, which
would make its numbers incomparable with ONNX Runtime's fp32.

Per-op times come from OpenVINO's performance counters (`PERF_COUNT`), per executed runtime node;
a runtime node's `originalLayersNames` (its runtime-model rt_info) lists the ONNX nodes fused
into it, where OpenVINO kept their names (a Conv whose BatchNormalization was folded into it is
renamed after the folded Multiply; the BatchNormalization and Relu keep theirs).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx

from prunec.errors import RuntimeUnavailableError
from prunec.runtime.opprofile import NodeTime, OpProfile, aggregate
from prunec.runtime.runtimes import ModelLike, Runtime, Session, Shapes, map_to_onnx, onnx_node_names
from prunec.runtime.target import Target

_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16", "fp32": "FP32"}


def unavailable_reason() -> str | None:
    """None when the openvino package imports, else how to install it."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "pip install 'prunec[openvino]' (the openvino package)"
    return None


@functools.lru_cache(maxsize=1)
def _core():
    import openvino as ov

    return ov.Core()


def _read(model: ModelLike, shapes: Shapes | None):
    core = _core()
    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory(prefix="prunec-ov-") as d:
            path = Path(d) / "model.onnx"
            big = model.ByteSize() > 2**30
            onnx.save_model(model, str(path), save_as_external_data=big, location="model.onnx.data")
            ov_model = core.read_model(str(path))
    else:
        ov_model = core.read_model(str(model))
    if shapes:
        by_name = {}
        for port in ov_model.inputs:
            for n in port.get_names():
                if n in shapes:
                    by_name[port] = list(shapes[n])
        if by_name:
            ov_model.reshape(by_name)
    return ov_model


def _config(target: Target, *, perf_count: bool = False) -> dict:
    cfg: dict = {"PERFORMANCE_HINT": "LATENCY",
                 "INFERENCE_PRECISION_HINT": _OV_PRECISION[target.precision_or_default]}
    if perf_count:
        cfg["PERF_COUNT"] = True
    if target.device_or_default == "CPU":
        # Pinned threads fight each other when several compiled models take turns in one process
        # (the profiler's ABBA): on a busy 2-core machine, five alternating copies of one conv
        # pair ran at 9.8-13.9 ms pinned and 5.8-9.8 ms unpinned.
        cfg["ENABLE_CPU_PINNING"] = False
        if target.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(target.threads)
    return cfg


class OpenVinoSession(Session):
    """A compiled model and one infer request."""

    def __init__(self, compiled, label: str):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._inputs = [p.get_any_name() for p in compiled.inputs]
        self._outputs = [p.get_any_name() for p in compiled.outputs]
        self.label = label

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    def input_batch(self) -> int | None:
        first = [p.get_partial_shape()[0] for p in self.compiled.inputs if p.get_partial_shape().rank.get_length()]
        if not first or not all(d.is_static for d in first):
            return None
        sizes = {d.get_length() for d in first}
        return sizes.pop() if len(sizes) == 1 else None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.request.infer(feeds)
        return {name: np.array(res[port]) for name, port in zip(self._outputs, self.compiled.outputs)}

    def infer(self, feeds: dict[str, np.ndarray]) -> None:
        self.request.infer(feeds, share_inputs=True, share_outputs=True)

    def close(self) -> None:
        self.request = None
        self.compiled = None


class OpenVinoRuntime(Runtime):
    """OpenVINO on one of its devices (CPU here; GPU/NPU where the machine has them)."""

    name = "openvino"
    static_shapes = True

    def version(self) -> str:
        import openvino as ov

        return ov.__version__

    def devices(self) -> list[str]:
        return list(_core().available_devices)

    def check(self, target: Target) -> None:
        dev = target.device_or_default
        devices = self.devices()
        base = dev.split(":")[0].split(".")[0]
        if base not in ("AUTO", "MULTI", "HETERO") and dev not in devices and base not in devices:
            raise RuntimeUnavailableError(f"OpenVINO device {dev!r} is not available here; "
                                          f"available devices: {', '.join(devices) or 'none'}")
        prec = target.precision_or_default
        if base in devices and prec != "fp32":
            caps = list(_core().get_property(base, "OPTIMIZATION_CAPABILITIES"))
            if _CAPABILITY[prec] not in caps:
                raise RuntimeUnavailableError(
                    f"OpenVINO {base} here has no {prec} support; its capabilities: {', '.join(caps)}")

    def open(self, model: ModelLike, target: Target, *, shapes: Shapes | None = None,
             spin: bool = False) -> OpenVinoSession:
        return self._open(model, target, shapes=shapes)

    def _open(self, model: ModelLike, target: Target, *, shapes: Shapes | None = None,
              perf_count: bool = False) -> OpenVinoSession:
        ov_model = _read(model, shapes)
        compiled = _core().compile_model(ov_model, target.device_or_default, _config(target, perf_count=perf_count))
        return OpenVinoSession(compiled, f"OpenVINO {target.device_or_default}")

    def op_profile(self, model: ModelLike, feeds: dict[str, np.ndarray], target: Target, *,
                   runs: int = 10, warmup: int = 2, batch: int = 1, top: int = 10,
                   names_from: onnx.ModelProto | None = None) -> OpProfile:
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        sess = self._open(model, target, shapes=shapes, perf_count=True)
        proto = names_from if names_from is not None else (model if isinstance(model, onnx.ModelProto) else None)
        origin = _original_names(sess.compiled, proto)
        for _ in range(warmup):
            sess.infer(feeds)
        per_node: dict[str, np.ndarray] = {}
        info: dict[str, NodeTime] = {}
        for k in range(runs):
            sess.infer(feeds)
            for p in sess.request.get_profiling_info():
                if p.status.name != "EXECUTED":
                    continue  # fused into another node, or a no-op reshape
                per_node.setdefault(p.node_name, np.zeros(runs))[k] += p.real_time.total_seconds() * 1e3
                info.setdefault(p.node_name, NodeTime(p.node_name, p.node_type, sess.label, 0.0,
                                                      kernel=p.exec_type, onnx_nodes=origin.get(p.node_name, [])))
        sess.close()
        return aggregate(per_node, info, runs=runs, batch=batch, top=top,
                         source="OpenVINO performance counters")


def _original_names(compiled, proto: onnx.ModelProto | None) -> dict[str, list[str]]:
    """Runtime node name -> the ONNX nodes fused into it (from `originalLayersNames`)."""
    if proto is None:
        return {}
    index = onnx_node_names(proto)
    out = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "originalLayersNames" not in info:
            continue
        names = str(info["originalLayersNames"].astype(str)).split(",")
        out[op.get_friendly_name()] = map_to_onnx(names + [op.get_friendly_name()], None, index)
    return out


RUNTIME = OpenVinoRuntime()
