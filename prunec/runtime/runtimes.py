"""One interface over the runtimes prunec measures on: open a model, run a batch, time it, per-op
times, available devices.

    rt = get_runtime("openvino")              # RuntimeUnavailableError lists what is here
    sess = rt.open(model, Target("openvino"), shapes={"x": (8, 3, 224, 224)})
    outputs = sess.run(feeds)                 # {name: ndarray}
    sess.infer(feeds)                         # the same run, outputs left where they are (timing)
    prof = rt.op_profile(model, feeds, target, runs=10)   # OpProfile, node names mapped to ONNX

A runtime whose engines are compiled for fixed shapes (OpenVINO here, TensorRT) says so with
`static_shapes`; the profiler then opens one session per batch size. The implementations live
in `ort_runtime`, `openvino_runtime` and `tensorrt_runtime`, imported on first use so that a
missing optional package only matters when that runtime is asked for.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import onnx

from prunec.errors import RuntimeUnavailableError
from prunec.runtime.target import RUNTIMES, Target

if TYPE_CHECKING:
    from prunec.runtime.opprofile import OpProfile

ModelLike = onnx.ModelProto | str | os.PathLike
Shapes = dict[str, tuple[int, ...]]


class Session(ABC):
    """A model opened on a runtime, ready to run on numpy feeds."""

    #: What ran the model, for reports: an ORT provider name, "OpenVINO CPU", "TensorRT cuda:0".
    label: str = ""

    @property
    @abstractmethod
    def input_names(self) -> list[str]:
        """Graph input names, in order."""

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """Graph output names, in order."""

    def input_batch(self) -> int | None:
        """The fixed batch size the inputs declare, or None when it is free."""
        return None

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; outputs by name, as numpy arrays the caller owns."""

    def infer(self, feeds: dict[str, np.ndarray]) -> None:
        """Run once for timing (outputs may stay in the runtime's buffers)."""
        self.run(feeds)

    def close(self) -> None:
        """Release what the session holds (engines, device memory)."""


class Runtime(ABC):
    """A runtime prunec can measure on."""

    name: str
    #: True when a session is compiled for fixed input shapes (one session per batch size).
    static_shapes: bool = False

    @abstractmethod
    def version(self) -> str:
        """The runtime's version string."""

    @abstractmethod
    def devices(self) -> list[str]:
        """Devices (or ORT providers) available here, as `--device`/`--provider` values."""

    @abstractmethod
    def check(self, target: Target) -> None:
        """Raise RuntimeUnavailableError (or ProviderError) naming what is available, if the
        target's provider, device or precision is not."""

    @abstractmethod
    def open(self, model: ModelLike, target: Target, *, shapes: Shapes | None = None,
             spin: bool = False) -> Session:
        """A session for `model` on `target`. `shapes` fixes input shapes where the runtime
        compiles for them; `spin=False` keeps idle worker threads from busy-waiting."""

    @abstractmethod
    def op_profile(self, model: ModelLike, feeds: dict[str, np.ndarray], target: Target, *,
                   runs: int = 10, warmup: int = 2, batch: int = 1, top: int = 10,
                   names_from: onnx.ModelProto | None = None) -> "OpProfile":
        """Per-op-type and per-node kernel times from the runtime's own profiler; node names
        are mapped to the ONNX nodes of `names_from` (default: `model` when it is a proto)."""

    def describe(self, target: Target) -> str:
        """What runs the model, for report headers."""
        return target.describe()


_MODULES = {"ort": "prunec.runtime.ort_runtime", "openvino": "prunec.runtime.openvino_runtime",
            "tensorrt": "prunec.runtime.tensorrt_runtime"}
_cache: dict[str, Runtime] = {}


def _unavailable_reason(name: str) -> str | None:
    """None when the runtime's module loads and says it is usable here, else why not."""
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # pragma: no cover - our own modules import lazily
        return str(exc)
    return mod.unavailable_reason()


def available_runtimes() -> dict[str, str | None]:
    """Every runtime prunec knows, with None when usable here or the reason it is not."""
    return {name: _unavailable_reason(name) for name in RUNTIMES}


def get_runtime(name: str) -> Runtime:
    """The runtime called `name`; a one-line error listing the usable ones if it is not here."""
    if name not in RUNTIMES:
        raise RuntimeUnavailableError(f"unknown runtime {name!r}; prunec knows {', '.join(RUNTIMES)}")
    if name in _cache:
        return _cache[name]
    why = _unavailable_reason(name)
    if why is not None:
        usable = [n for n, r in available_runtimes().items() if r is None]
        raise RuntimeUnavailableError(f"runtime {name!r} is not available here ({why}); "
                                      f"available runtimes: {', '.join(usable) or 'none'}")
    mod = importlib.import_module(_MODULES[name])
    _cache[name] = mod.RUNTIME
    return _cache[name]


def check_target(target: Target) -> Runtime:
    """Fail fast, before any work, when the target cannot run here; returns its runtime."""
    rt = get_runtime(target.runtime)
    rt.check(target)
    return rt


def open_session(model: ModelLike, target: Target, *, shapes: Shapes | None = None,
                 spin: bool = False) -> Session:
    """Open `model` on `target` (checked first)."""
    rt = check_target(target)
    return rt.open(model, target, shapes=shapes, spin=spin)


def onnx_node_names(model: onnx.ModelProto) -> tuple[set[str], dict[str, str]]:
    """ONNX node names, and tensor name -> producing node name: what runtime names map back to."""
    names = {n.name for n in model.graph.node if n.name}
    produced = {o: n.name for n in model.graph.node for o in n.output if n.name}
    return names, produced


def map_to_onnx(candidates: list[str], model: onnx.ModelProto | None,
                index: tuple[set[str], dict[str, str]] | None = None) -> list[str]:
    """The ONNX nodes among a runtime layer's original names (node or output tensor names),
    in order, without duplicates; an empty list where the runtime kept none of them."""
    if model is None and index is None:
        return []
    names, produced = index if index is not None else onnx_node_names(model)
    out: list[str] = []
    for c in candidates:
        c = c.strip()
        hit = c if c in names else produced.get(c)
        if hit and hit not in out:
            out.append(hit)
    return out
