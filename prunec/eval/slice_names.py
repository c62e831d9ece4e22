"""The slice names an evaluation will have, known before any model runs (--slice-max-drop checks).

The Evaluator builds its slices only after running the original over every input variant, because
without labels its class slices come from the original's predictions (`pred=<class id>`). Every
other name is known beforehand: from the data (labels, user columns, lengths), the requested
corruptions and severities, and the evaluated output's declared shape (whether there are class
slices at all, and how many classes). So a --slice-max-drop typo is reported before that work
(which is ~45 s on an OCR recognizer with 400 words). A `pred=<id>` name is accepted early when
that class could be predicted; the Evaluator's own check after the run stays as the backstop.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import onnx

from prunec.eval.data import EvalData
from prunec.eval.slices import KINDS, Slice, build_slices, corruption_names
from prunec.errors import OptionError
from prunec.runtime.inputs import graph_inputs

#: Errors list this many names, then a count.
SHOWN = 25

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
_GLOB = "*?["


def is_glob(key: str) -> bool:
    """Whether a --slice-max-drop key is a glob over slice names (`gaussian_noise@*`)."""
    return any(ch in key for ch in _GLOB)


@dataclass
class SliceNames:
    """Slice names as far as they are known: `names` for sure (in build_slices order), plus, when
    class slices come from predictions not made yet, `<open_prefix>=<id>` for ids below
    `open_classes` (None: any id; the output's class count is not declared)."""

    names: list[str]
    open_prefix: str | None = None
    open_classes: int | None = None

    @classmethod
    def of(cls, slices: list[Slice]) -> SliceNames:
        """The names of slices already built (nothing left open)."""
        return cls([s.name for s in slices])

    def _could_be_open(self, key: str) -> bool:
        if self.open_prefix is None:
            return False
        if is_glob(key):
            # Predicted classes may also make a `rare` slice.
            if self.open_classes is None or fnmatch.fnmatchcase("rare", key):
                return True  # unknown ids: only the predictions can tell; the late check decides
            return any(fnmatch.fnmatchcase(f"{self.open_prefix}={i}", key) for i in range(self.open_classes))
        # class_slices writes ids as str(int): `pred=7`, never `pred=07`.
        m = re.fullmatch(rf"{re.escape(self.open_prefix)}=(0|[1-9][0-9]*)", key)
        return m is not None and (self.open_classes is None or int(m.group(1)) < self.open_classes)

    def could_name(self, key: str) -> bool:
        """Whether a --slice-max-drop key names (or could name) a slice, a slice kind, or is a glob
        matching (or that could match) a slice."""
        if key in KINDS or key in self.names:
            return True
        if is_glob(key) and any(fnmatch.fnmatchcase(n, key) for n in self.names):
            return True
        return self._could_be_open(key)

    def shown(self) -> list[str]:
        """The names an error lists: the sure ones, with the open class ids after `all`, where
        build_slices puts class slices."""
        if self.open_prefix is None:
            return list(self.names)
        p, c = self.open_prefix, self.open_classes
        if c is not None and c <= SHOWN:
            open_names = [f"{p}={i}" for i in range(c)]
        else:
            open_names = [f"{p}=<class id{f' 0..{c - 1}' if c is not None else ''}>"]
        return self.names[:1] + open_names + self.names[1:]

    def check(self, keys) -> None:
        """Raise OptionError (one line: the bad key, the slice names, the kinds) for the first
        --slice-max-drop key that names no slice, no kind, and matches no slice as a glob."""
        for key in keys:
            if self.could_name(key):
                continue
            names = self.shown()
            listed = ", ".join(names[:SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > SHOWN else "")
            raise OptionError(f"--slice-max-drop {key}: no slice, slice kind or glob match by that name; "
                              f"slices: {listed}; kinds: {', '.join(KINDS)}")


def _declared_output(model: onnx.ModelProto, name: str) -> tuple[bool | None, int | None, int | None]:
    """(float?, rank, size of the last axis) as the graph declares output `name`; None where not declared."""
    vi = next(o for o in model.graph.output if o.name == name)
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None:
        return None, None, None
    floating = None
    if tt.elem_type:
        # Other types the runtime may return as float (bfloat16, ...) stay unknown, never "not float".
        floating = True if tt.elem_type in _FLOAT_TYPES else (
            False if onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).kind in "iub" else None)
    if not tt.HasField("shape"):
        return floating, None, None
    dims = tt.shape.dim
    last = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0 else None
    return floating, len(dims), last


def expected_slice_names(model: onnx.ModelProto, data: EvalData, *, corruptions: list[str] = (),
                         severities: list[int] = (3,), output: str | None = None, metric=None,
                         rare_quantile: float = 0.25) -> SliceNames | None:
    """The slice names an Evaluator for `model` on `data` (same settings) will build, without
    running the model; None when `output` is not an output of the model (the Evaluator says so).

    Mirrors Evaluator.__init__: class slices come from 1-D labels under a task metric; from the
    labels when the output is a rank-2 classifier; and without labels from the predictions of a
    rank-2 float output with at least 2 classes (left open: `pred=<id>`). Where the declared
    output leaves that undecided, the names are a superset (the late check is the backstop)."""
    outputs = [o.name for o in model.graph.output]
    name = output or (outputs[0] if outputs else None)
    if name not in outputs:
        return None
    floating, rank, classes_n = _declared_output(model, name)
    labels = data.labels
    classes, open_prefix = None, None
    if metric is not None:
        classes = labels if labels is not None and labels.ndim == 1 else None
    elif labels is not None:
        classes = labels if rank in (None, 2) else None
    elif floating is not False and rank in (None, 2) and (classes_n is None or classes_n >= 2):
        open_prefix = "pred"
    slices = build_slices(data, graph_inputs(model), classes=classes, class_prefix="class",
                          corruption_variants=corruption_names(list(corruptions), list(severities)),
                          rare_quantile=rare_quantile)
    return SliceNames([s.name for s in slices], open_prefix, classes_n if open_prefix else None)
