"""TensorRT behind the runtime interface, through the `tensorrt` package on a CUDA device.

An engine is built per model, input shapes and precision (fp32 without TF32, fp16, or int8 with
fp16 fallback) with 2:4 sparse tactics enabled (`BuilderFlag.SPARSE_WEIGHTS`): TensorRT then
picks a sparse kernel for a layer whose weights are 2:4 sparse wherever that kernel is faster,
and says so in its builder log ("(Sparsity) ... picked sparse implementation for layers: ...")
and in the engine inspector's tactic names. `sparse_layers` reports the union of both.

int8 engines are built without calibration data (every tensor gets the range [-4, 4]): good for
timing, not for accuracy; outputs of an int8 engine are not compared with anything.

Engines are cached in the process by (model bytes, shapes, precision, device), so the profiler's
freshly built sessions are fresh execution contexts over one engine: building is minutes, not
what a latency comparison should repeat. Input and output copies between host and device are
part of every run, as they are for ONNX Runtime's CUDA provider on numpy inputs.

Without the `tensorrt` package or a CUDA device this runtime is unavailable, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx

from prunec.errors import RuntimeUnavailableError
from prunec.runtime import cuda
from prunec.runtime.opprofile import NodeTime, OpProfile, aggregate
from prunec.runtime.runtimes import ModelLike, Runtime, Session, Shapes, map_to_onnx, onnx_node_names
from prunec.runtime.target import Target

#: Range given to every tensor of an uncalibrated int8 engine (timing only).
INT8_RANGE = 4.0
_SPARSE_LOG = re.compile(r"picked sparse implementation for layers:\s*(.*)", re.IGNORECASE)


def unavailable_reason() -> str | None:
    """None when `tensorrt` imports and a CUDA device is present, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "pip install tensorrt (needs an NVIDIA GPU and driver)"
    return cuda.why_no_device()


def parse_sparse_log(lines: list[str]) -> list[str]:
    """Layer names from TensorRT's '(Sparsity) TRT inference plan picked sparse implementation
    for layers: a, b' builder messages (a layer name may itself contain ' + ' for fusions)."""
    out: list[str] = []
    for line in lines:
        m = _SPARSE_LOG.search(line)
        if m:
            out += [n.strip() for n in m.group(1).split(",") if n.strip()]
    return list(dict.fromkeys(out))


def sparse_tactic_layers(inspector_json: dict) -> list[str]:
    """Layers whose chosen tactic is a sparse kernel, from the engine inspector's JSON."""
    out = []
    for layer in inspector_json.get("Layers", []):
        if isinstance(layer, dict) and "sparse" in str(layer.get("TacticName", "")).lower():
            out.append(str(layer.get("Name", "?")))
    return out


class _Engine:
    """A built engine and what the build said."""

    def __init__(self, engine, sparse_layers: list[str], layer_names: list[str], runtime=None):
        self.runtime = runtime  # the trt.Runtime that deserialized the engine: kept alive with it
        self.engine = engine
        self.sparse_layers = sparse_layers
        self.layer_names = layer_names


_engines: dict[tuple, _Engine] = {}


def _model_bytes(model: ModelLike) -> tuple[bytes | None, str | None]:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), None
    return None, str(model)


def _build(model: ModelLike, target: Target, shapes: Shapes) -> _Engine:
    import tensorrt as trt

    data, path = _model_bytes(model)
    digest = hashlib.sha1(data if data is not None else Path(path).read_bytes()).hexdigest()
    key = (digest, tuple(sorted(shapes.items())), target.precision_or_default, target.device_or_default)
    if key in _engines:
        return _engines[key]
    messages: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            messages.append(str(msg))

    logger = Logger()
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="prunec-trt-") as d:
        if data is not None:  # parse from a file so external data resolves like ORT's
            path = str(Path(d) / "model.onnx")
            onnx.save_model(model, path, save_as_external_data=len(data) > 2**30, location="model.onnx.data")
        if not parser.parse_from_file(path):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeUnavailableError(f"TensorRT cannot parse the model: {errs}")
    config = builder.create_builder_config()
    prec = target.precision_or_default
    if prec == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, comparable with ORT CPU
    if prec in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if prec == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        _uncalibrated_ranges(network)
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = shapes.get(t.name)
        if shape is None:
            raise RuntimeUnavailableError(f"TensorRT needs a concrete shape for input {t.name!r}")
        profile.set_shape(t.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        tail = [m for m in messages if "error" in m.lower()][-1:] or messages[-1:]
        raise RuntimeUnavailableError(f"TensorRT could not build an engine: {' '.join(tail) or 'no log'}")
    trt_runtime = trt.Runtime(logger)
    engine = trt_runtime.deserialize_cuda_engine(plan)
    inspected: list[str] = []
    layer_names: list[str] = []
    try:
        doc = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        inspected = sparse_tactic_layers(doc)
        layer_names = [str(x.get("Name", x)) if isinstance(x, dict) else str(x) for x in doc.get("Layers", [])]
    except Exception:  # the inspector is informational; the log still says what ran sparse
        pass
    built = _Engine(engine, list(dict.fromkeys(parse_sparse_log(messages) + inspected)), layer_names, trt_runtime)
    _engines[key] = built
    return built


def _uncalibrated_ranges(network) -> None:
    """Give every tensor a fixed int8 range so int8 kernels can be timed without calibration."""
    if network.num_inputs and not hasattr(network.get_input(0), "set_dynamic_range"):
        raise RuntimeUnavailableError("this TensorRT has no ITensor.set_dynamic_range: int8 engines need "
                                      "an explicitly quantized (Q/DQ) model here")
    for i in range(network.num_inputs):
        network.get_input(i).set_dynamic_range(-INT8_RANGE, INT8_RANGE)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            out = layer.get_output(j)
            if out is not None and out.dtype.name in ("FLOAT", "HALF"):
                out.set_dynamic_range(-INT8_RANGE, INT8_RANGE)


class TensorRTSession(Session):
    """An execution context over a cached engine, with device buffers for every I/O tensor."""

    def __init__(self, built: _Engine, target: Target, shapes: Shapes):
        import tensorrt as trt

        self.built = built
        self.ctx = cuda.Context(int(target.device_or_default))
        self.context = built.engine.create_execution_context()
        self.label = f"TensorRT cuda:{target.device_or_default} ({target.precision_or_default})"
        engine = built.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        for n in self._inputs:
            self.context.set_input_shape(n, tuple(shapes[n]))
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        for n in names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            shape = tuple(self.context.get_tensor_shape(n))
            self.host[n] = np.empty(shape, dtype=dtype)
            self.device[n] = self.ctx.alloc(self.host[n].nbytes)
            self.context.set_tensor_address(n, self.device[n])

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    def input_batch(self) -> int | None:
        dims = {self.host[n].shape[0] for n in self._inputs if self.host[n].ndim}
        return dims.pop() if len(dims) == 1 else None

    def _execute(self, feeds: dict[str, np.ndarray]) -> None:
        for n in self._inputs:
            self.ctx.to_device(self.device[n], np.asarray(feeds[n], dtype=self.host[n].dtype))
        if not self.context.execute_async_v3(self.ctx.stream.value or 0):
            raise RuntimeError("TensorRT execution failed")
        self.ctx.synchronize()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._execute(feeds)
        return {n: self.ctx.to_host(self.device[n], np.empty_like(self.host[n])) for n in self._outputs}

    def infer(self, feeds: dict[str, np.ndarray]) -> None:
        self._execute(feeds)
        for n in self._outputs:
            self.ctx.to_host(self.device[n], self.host[n])

    def close(self) -> None:
        for ptr in self.device.values():
            self.ctx.free(ptr)
        self.device = {}
        self.context = None
        self.ctx.close()


class TensorRTRuntime(Runtime):
    """TensorRT engines on a CUDA device."""

    name = "tensorrt"
    static_shapes = True

    def version(self) -> str:
        import tensorrt as trt

        return trt.__version__

    def devices(self) -> list[str]:
        return cuda.devices()

    def check(self, target: Target) -> None:
        devs = self.devices()
        if not str(target.device_or_default).isdigit() or int(target.device_or_default) >= len(devs):
            raise RuntimeUnavailableError(f"CUDA device {target.device_or_default!r} is not available; "
                                          f"--device takes an index: {', '.join(devs) or 'no CUDA device'}")

    def open(self, model: ModelLike, target: Target, *, shapes: Shapes | None = None,
             spin: bool = False) -> TensorRTSession:
        shapes = shapes or _default_shapes(model)
        return TensorRTSession(_build(model, target, shapes), target, shapes)

    def sparse_layers(self, model: ModelLike, target: Target, shapes: Shapes) -> list[str]:
        """Layers TensorRT built with sparse kernels for these shapes."""
        return list(_build(model, target, shapes).sparse_layers)

    def op_profile(self, model: ModelLike, feeds: dict[str, np.ndarray], target: Target, *,
                   runs: int = 10, warmup: int = 2, batch: int = 1, top: int = 10,
                   names_from: onnx.ModelProto | None = None) -> OpProfile:
        import tensorrt as trt

        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        sess = self.open(model, target, shapes=shapes)
        proto = names_from if names_from is not None else (model if isinstance(model, onnx.ModelProto) else None)
        index = onnx_node_names(proto) if proto is not None else None
        times: list[dict[str, float]] = []

        class Profiler(trt.IProfiler):
            def __init__(self):
                trt.IProfiler.__init__(self)

            def report_layer_time(self, layer_name, ms):
                times[-1][layer_name] = times[-1].get(layer_name, 0.0) + ms

        for _ in range(warmup):
            sess.infer(feeds)
        sess.context.profiler = Profiler()
        for _ in range(runs):
            times.append({})
            sess.infer(feeds)
        sparse = set(sess.built.sparse_layers)
        per_node: dict[str, np.ndarray] = {}
        info: dict[str, NodeTime] = {}
        for k, run in enumerate(times):
            for name, ms in run.items():
                per_node.setdefault(name, np.zeros(runs))[k] = ms
                parts = [p.strip() for p in name.replace("||", "+").split("+")]
                info.setdefault(name, NodeTime(name, _layer_kind(name), sess.label, 0.0,
                                               kernel="sparse" if name in sparse else None,
                                               onnx_nodes=map_to_onnx(parts, None, index) if index else []))
        layers = list(sess.built.sparse_layers)
        sess.close()
        return aggregate(per_node, info, runs=runs, batch=batch, top=top, source="TensorRT IProfiler",
                         sparse_layers=layers)


def _layer_kind(name: str) -> str:
    """A TensorRT layer's kind from its name: the ONNX op type of its first fused node, where the
    exporter named nodes '/path/OpType' (torch does), else 'layer'."""
    first = name.split("+")[0].strip()
    tail = first.rsplit("/", 1)[-1]
    kind = re.sub(r"_\d+$", "", tail)
    return kind if kind and kind[0].isupper() else "layer"


def _default_shapes(model: ModelLike) -> Shapes:
    """Declared input shapes with a symbolic batch of 1 (other symbolic dims are an error)."""
    from prunec.runtime.inputs import resolve_input_shapes

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return resolve_input_shapes(proto, None, batch=1)


RUNTIME = TensorRTRuntime()
