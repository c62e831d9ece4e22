"""Where a model runs: a runtime (ORT, OpenVINO, TensorRT), its provider or device, a precision.

A `Target` is what `--runtime/--provider/--device/--precision/--threads` mean, in one value that
the profiler, the latency budget, the accuracy gate and the `channels` pass all receive. Its `key`
(`ort-cpu`, `openvino-cpu`, `tensorrt-fp16`, ...) names the target for channel rounding
(`-O channels.target=KEY`) and in reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from prunec.errors import OptionError

RUNTIMES = ("ort", "openvino", "tensorrt")

#: Precisions each runtime can be asked for; the first is its default. ORT runs the model as
#: stored (fp32 models stay fp32); OpenVINO is pinned to f32 by default so its numbers compare
#: with ORT's (its own CPU default is bf16 where the CPU has bf16 instructions); TensorRT
#: defaults to fp16, the precision it is deployed at.
PRECISIONS = {"ort": ("fp32", "fp16", "int8"), "openvino": ("fp32", "bf16", "fp16"),
              "tensorrt": ("fp16", "fp32", "int8")}

#: Short provider names (what users type) for the target key.
_PROVIDER_SHORT = {"cpuexecutionprovider": "cpu", "cudaexecutionprovider": "cuda",
                   "tensorrtexecutionprovider": "tensorrt", "trt": "tensorrt",
                   "openvinoexecutionprovider": "openvino", "dmlexecutionprovider": "dml",
                   "coremlexecutionprovider": "coreml", "xnnpackexecutionprovider": "xnnpack",
                   "rocmexecutionprovider": "rocm", "qnnexecutionprovider": "qnn"}


@dataclass(frozen=True)
class Target:
    """A runtime and how to run on it. `None` fields mean the runtime's default."""

    runtime: str = "ort"
    provider: str = "cpu"  # ONNX Runtime only
    device: str | None = None  # OpenVINO: CPU, GPU, NPU, AUTO... (default CPU); TensorRT: CUDA index (0)
    precision: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise OptionError(f"--runtime {self.runtime!r}: expected one of {', '.join(RUNTIMES)}")
        if self.runtime != "ort" and self.provider.lower() not in ("cpu", "cpuexecutionprovider"):
            raise OptionError(f"--provider is an ONNX Runtime option; --runtime {self.runtime} "
                              "selects hardware with --device")
        if self.runtime == "ort" and self.device is not None and self.provider_short == "cpu":
            raise OptionError("--device is not an option of ONNX Runtime's CPU provider; "
                              "ONNX Runtime selects hardware with --provider")
        if self.precision is not None and self.precision not in PRECISIONS[self.runtime]:
            raise OptionError(f"--precision {self.precision!r} is not available on {self.runtime}; "
                              f"available: {', '.join(PRECISIONS[self.runtime])}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads must be at least 1, got {self.threads}")

    @property
    def provider_short(self) -> str:
        """The ORT provider as users type it: cpu, cuda, tensorrt, ..."""
        p = self.provider.lower()
        return _PROVIDER_SHORT.get(p, p)

    @property
    def precision_or_default(self) -> str:
        """The precision actually asked of the runtime."""
        return self.precision or PRECISIONS[self.runtime][0]

    @property
    def device_or_default(self) -> str:
        """OpenVINO's device name, TensorRT's CUDA device index, or ORT's provider."""
        if self.runtime == "openvino":
            return (self.device or "CPU").upper()
        if self.runtime == "tensorrt":
            return self.device or "0"
        return self.provider_short

    @property
    def key(self) -> str:
        """Short name of the target: ort-cpu, ort-cuda, openvino-cpu, openvino-cpu-bf16, tensorrt-fp16."""
        if self.runtime == "ort":
            base = f"ort-{self.provider_short}"
            if self.provider_short == "tensorrt" or self.precision not in (None, "fp32"):
                base += f"-{self.precision_or_default}"
            return base
        if self.runtime == "openvino":
            dev = self.device_or_default.split(".")[0].split(":")[0].lower()
            p = self.precision_or_default
            return f"openvino-{dev}" + ("" if p == "fp32" else f"-{p}")
        return f"tensorrt-{self.precision_or_default}"

    def describe(self) -> str:
        """Human-readable: 'ONNX Runtime CPUExecutionProvider', 'OpenVINO CPU (fp32)', ..."""
        if self.runtime == "ort":
            return f"ONNX Runtime {self.provider}"
        name = {"openvino": "OpenVINO", "tensorrt": "TensorRT"}[self.runtime]
        dev = self.device_or_default if self.runtime == "openvino" else f"cuda:{self.device_or_default}"
        return f"{name} {dev} ({self.precision_or_default})"

    def with_threads(self, threads: int | None) -> "Target":
        """The same target with another thread count."""
        return replace(self, threads=threads)

    def to_dict(self) -> dict:
        """JSON-ready dict, with the key and the effective precision."""
        return {**asdict(self), "key": self.key, "precision": self.precision_or_default}

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        """Inverse of to_dict (extra keys ignored)."""
        return cls(runtime=d.get("runtime", "ort"), provider=d.get("provider", "cpu"),
                   device=d.get("device"), precision=d.get("precision"), threads=d.get("threads"))


def as_target(target: Target | None = None, *, provider: str | None = None,
              threads: int | None = None) -> Target:
    """A Target from either a Target or the older (provider, threads) keywords."""
    if target is not None:
        return target if threads is None else target.with_threads(threads)
    return Target(provider=provider or "cpu", threads=threads)
