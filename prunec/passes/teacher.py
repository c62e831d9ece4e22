"""The teacher's side of distillation: run the baseline model once over the calibration samples
under ONNX Runtime, and keep its outputs (and any matched intermediate tensors) on disk.

Arrays are written batch by batch into .npy files in a temporary folder and read back memory
mapped, so a large calibration set costs disk, not memory; the folder lives as long as the
`TeacherCache` (one distill pass), and the teacher runs exactly once per sample.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from prunec.runtime.session import make_session


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the intermediate tensors `names` (ONNX Runtime infers
    their types)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return m


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size baked into the model's first input (axis 0), or None when it is symbolic."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
        return None
    return None


class TeacherCache:
    """The baseline's outputs (and extra tensors) for every calibration sample, on disk."""

    def __init__(self, model: onnx.ModelProto, inputs: dict[str, np.ndarray], names: list[str], *,
                 batch: int = 32):
        self._dir = tempfile.TemporaryDirectory(prefix="prunec-teacher-")
        n = len(next(iter(inputs.values())))
        sess = make_session(with_outputs(model, names))
        feed_names = [i.name for i in sess.get_inputs()]
        files: dict[str, np.lib.format.open_memmap] = {}
        step = fixed_batch(model) or batch
        for start in range(0, n, step):
            feeds = {k: inputs[k][start:start + step] for k in feed_names}
            outs = sess.run(names, feeds)
            for name, value in zip(names, outs):
                if name not in files:
                    path = Path(self._dir.name) / f"{len(files)}.npy"
                    files[name] = np.lib.format.open_memmap(path, mode="w+", dtype=value.dtype,
                                                            shape=(n, *value.shape[1:]))
                files[name][start:start + len(value)] = value
        for f in files.values():
            f.flush()
        self.arrays = {name: np.load(f.filename, mmap_mode="r") for name, f in files.items()}
        self.bytes = sum(a.nbytes for a in self.arrays.values())

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The cached tensors of samples `idx` (in that order)."""
        return {k: np.asarray(v[idx]) for k, v in self.arrays.items()}

    def close(self) -> None:
        """Delete the files."""
        self.arrays = {}
        self._dir.cleanup()
