"""The channel multiple each target's fast kernels want, for `channels round=auto`.

A channel count that is not a multiple of the target's block pushes a layer onto slower kernels
(ORT CPU: off the NCHWc path, with layout reorders around it) or leaves vector lanes and tensor
core tiles partly empty. The multiples, and where they come from:

| target | multiple | source |
|---|---|---|
| `ort-cpu` | 16 with AVX-512, else 8 | MLAS's NCHWc block (`prunec.runtime.cpu`) |
| `openvino-cpu` (fp32) | 16 with AVX-512, else 8 | OpenVINO's CPU plugin runs convolutions channels-last (nhwc) on oneDNN's brgconv kernels whenever AVX2 is there (`Convolution::initSupportedPrimitiveDescriptors`, `isBrgConvAvailable`), falling back to nChw16c/nChw8c blocked layouts; either way channels map onto one zmm (16 fp32) or ymm (8 fp32) register, and a remainder runs a masked tail |
| `openvino-cpu-bf16`, `-fp16` | 32 | 16 output lanes x 2 bf16 per VNNI pair (AMX tiles: 32 bf16 along K) |
| `openvino-gpu` | 16 | the Intel GPU plugin's fsv16 blocked layouts (`b_fs_yx_fsv16`) |
| `openvino-npu` | 1 | no documented block: not rounded (use `round=measure` on the device) |
| `tensorrt-fp16`, `ort-cuda`, `ort-tensorrt-fp16` | 8 | tensor cores: fp16 channel counts in multiples of 8 (16 bytes), NVIDIA's performance guide |
| `tensorrt-int8`, `ort-tensorrt-int8` | 32 | int8 tensor-core kernels use TensorRT's 32-wide vectorized formats (`kCHW32`); 16 is the minimum |
| `tensorrt-fp32`, `ort-tensorrt-fp32` | 4 | 16-byte vector accesses (TF32 tensor cores, when enabled, want the same) |

OpenVINO's CPU multiple was checked by measurement (BENCHMARKS.md, "Runtimes").
"""

from __future__ import annotations

import platform

from prunec.errors import OptionError
from prunec.runtime.cpu import channel_block, cpu_flags
from prunec.runtime.target import RUNTIMES, Target

#: The `channels.target` keys this table knows (besides `auto`).
KNOWN_TARGETS = ("ort-cpu", "ort-cuda", "ort-tensorrt-fp32", "ort-tensorrt-fp16", "ort-tensorrt-int8",
                 "openvino-cpu", "openvino-cpu-bf16", "openvino-cpu-fp16", "openvino-gpu", "openvino-npu",
                 "tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8")


def _avx512() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and "avx512f" in cpu_flags()


def parse_target_key(key: str) -> Target:
    """`openvino-cpu-bf16` -> Target('openvino', device='CPU', precision='bf16'); an unknown key
    is an error listing the known ones."""
    parts = key.lower().split("-")
    if parts[0] not in RUNTIMES or key.lower() not in KNOWN_TARGETS:
        raise OptionError(f"channels.target {key!r}: expected auto or one of {', '.join(KNOWN_TARGETS)}")
    if parts[0] == "ort":
        return Target("ort", provider=parts[1], precision=parts[2] if len(parts) > 2 else None)
    if parts[0] == "openvino":
        return Target("openvino", device=parts[1].upper(), precision=parts[2] if len(parts) > 2 else None)
    return Target("tensorrt", precision=parts[1])


def channel_multiple(target: Target | str) -> tuple[int, str]:
    """The channel multiple for `target` (a Target or a key) and why."""
    t = parse_target_key(target) if isinstance(target, str) else target
    key = t.key
    if key == "ort-cpu" or (t.runtime == "ort" and t.provider_short not in ("cuda", "tensorrt")):
        return channel_block()
    prec = t.precision_or_default
    if t.runtime == "openvino":
        dev = t.device_or_default.split(".")[0].split(":")[0]
        if dev == "CPU":
            if prec in ("bf16", "fp16"):
                return 32, f"OpenVINO CPU {prec}: 16 output lanes x 2 values per VNNI pair"
            if _avx512():
                return 16, "AVX-512: OpenVINO's CPU convolutions (brgconv, nhwc) work on 16 fp32 channels per register"
            return 8, "OpenVINO's CPU convolutions work on 8 fp32 channels per AVX2 register (16 with AVX-512)"
        if dev == "GPU":
            return 16, "OpenVINO GPU: fsv16 blocked layouts (b_fs_yx_fsv16)"
        return 1, f"OpenVINO {dev}: no documented channel block, widths not rounded (try round=measure)"
    if t.runtime == "ort" and t.provider_short == "cuda":
        return 8, "CUDA tensor cores: channel counts in multiples of 8"
    if prec == "int8":
        return 32, "TensorRT int8: tensor-core kernels use 32-wide channel vectors (kCHW32)"
    if prec == "fp16":
        return 8, "TensorRT fp16: tensor cores want channel counts in multiples of 8"
    return 4, "TensorRT fp32: 16-byte vector accesses (4 fp32 channels)"
