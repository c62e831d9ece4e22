"""The few CUDA driver calls the TensorRT runtime needs, through ctypes on libcuda.

The driver library comes with every NVIDIA driver, so nothing beyond `tensorrt` has to be
installed (no cuda-python, pycuda or torch). Device memory is allocated in the device's primary
context, which is the context the CUDA runtime (and so TensorRT) uses as well.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np


class CudaError(RuntimeError):
    """A CUDA driver call failed, or there is no driver or device here."""


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise CudaError("no CUDA driver (libcuda.so.1 not found)")
    _check(lib.cuInit(0), "cuInit")
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CudaError(f"{what} failed with CUDA error {status}")


def devices() -> list[str]:
    """`cuda:N (name)` for every CUDA device; an empty list without a driver or device."""
    try:
        lib = _lib()
    except CudaError:
        return []
    n = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return []
    out = []
    for i in range(n.value):
        dev = ctypes.c_int(0)
        buf = ctypes.create_string_buffer(256)
        lib.cuDeviceGet(ctypes.byref(dev), i)
        lib.cuDeviceGetName(buf, 256, dev)
        out.append(f"cuda:{i} ({buf.value.decode(errors='replace')})")
    return out


def why_no_device() -> str | None:
    """None when at least one CUDA device is usable, else the reason (for skips and errors)."""
    try:
        _lib()
    except CudaError as exc:
        return str(exc)
    return None if devices() else "the CUDA driver reports no device"


class Context:
    """The primary context of one device, made current, with one stream."""

    def __init__(self, index: int = 0):
        lib = _lib()
        self.dev = ctypes.c_int(0)
        _check(lib.cuDeviceGet(ctypes.byref(self.dev), int(index)), "cuDeviceGet")
        self.ctx = ctypes.c_void_p()
        _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), self.dev), "cuDevicePrimaryCtxRetain")
        _check(lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.stream = ctypes.c_void_p()
        _check(lib.cuStreamCreate(ctypes.byref(self.stream), 0), "cuStreamCreate")

    def alloc(self, nbytes: int) -> int:
        """Device memory of at least `nbytes` (at least 1 byte); returns the device pointer."""
        ptr = ctypes.c_uint64(0)
        _check(_lib().cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(max(1, int(nbytes)))), "cuMemAlloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        """Release device memory from `alloc`."""
        _lib().cuMemFree_v2(ctypes.c_uint64(ptr))

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        """Copy a host array into device memory (synchronous)."""
        a = np.ascontiguousarray(array)
        _check(_lib().cuMemcpyHtoD_v2(ctypes.c_uint64(ptr), a.ctypes.data_as(ctypes.c_void_p),
                                      ctypes.c_size_t(a.nbytes)), "cuMemcpyHtoD")

    def to_host(self, ptr: int, out: np.ndarray) -> np.ndarray:
        """Copy device memory into a contiguous host array (synchronous)."""
        _check(_lib().cuMemcpyDtoH_v2(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(ptr),
                                      ctypes.c_size_t(out.nbytes)), "cuMemcpyDtoH")
        return out

    def synchronize(self) -> None:
        """Wait for the stream."""
        _check(_lib().cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def close(self) -> None:
        """Destroy the stream and release the primary context."""
        if self.stream:
            _lib().cuStreamDestroy_v2(self.stream)
            self.stream = ctypes.c_void_p()
            _lib().cuDevicePrimaryCtxRelease_v2(self.dev)
