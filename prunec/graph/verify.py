"""Proof that a rewritten model is still a valid, runnable, equivalent (or knowingly lossy) model.

Checks, in order, each failing with a `VerificationError` that names the check:
1. the full ONNX checker, 2. strict shape inference, 3. the interface (input/output names,
dtypes, dims; symbolic dims must stay symbolic), 4. an ONNX Runtime session loads it, 5. outputs
on deterministic random inputs: equal to the reference within tolerance for exact rewrites,
finite (with the deviation measured) for lossy ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from prunec.errors import ModelRunError, VerificationError
from prunec.runtime.inputs import random_inputs, resolve_input_shapes
from prunec.runtime.session import make_session, run_session

_CHECK_LIMIT = 2**31 - 64 * 2**20


@dataclass
class OutputDeviation:
    """How far one output moved: max abs error, error relative to the reference's max magnitude."""

    max_abs: float
    rel: float
    cosine: float


@dataclass
class VerifyReport:
    """What verification found; `deviation` is per output, against the reference model."""

    exact: bool
    rtol: float
    deviation: dict[str, OutputDeviation] = field(default_factory=dict)

    @property
    def max_rel(self) -> float:
        return max((d.rel for d in self.deviation.values()), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((d.cosine for d in self.deviation.values()), default=1.0)

    def to_dict(self) -> dict:
        return {"exact": self.exact, "rtol": self.rtol, "max_rel": self.max_rel,
                "min_cosine": self.min_cosine,
                "outputs": {k: vars(v) for k, v in self.deviation.items()}}


def deviation(ref: np.ndarray, got: np.ndarray) -> OutputDeviation:
    """Max abs error, max abs error over max |ref|, and cosine similarity of two arrays."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    max_abs = float(np.max(np.abs(r - g))) if r.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    nr, ng = np.linalg.norm(r), np.linalg.norm(g)
    cos = float(r @ g / (nr * ng)) if nr > 0 and ng > 0 else float(nr == ng)
    return OutputDeviation(max_abs, rel, cos)


def check_structure(model: onnx.ModelProto) -> None:
    """The ONNX checker, then strict shape inference with type checks (a full check, split so
    that each failure names its stage)."""
    try:
        onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise VerificationError(f"ONNX checker: {_first_line(exc)}") from exc
    from prunec.graph.sparse import densified

    try:
        # Sparse initializers are typed as sparse tensors by ONNX but densified by ONNX Runtime
        # at load; check the dense form the runtime executes.
        onnx.shape_inference.infer_shapes(densified(model), check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        raise VerificationError(f"strict shape inference: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _interface(values) -> dict[str, tuple[int, tuple]]:
    out = {}
    for vi in values:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim) if tt.HasField("shape") else None
        out[vi.name] = (tt.elem_type, dims)
    return out


def check_interface(reference: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Inputs and outputs keep names, dtypes and dims; symbolic dims stay symbolic."""
    ref_inits = {t.name for t in reference.graph.initializer}
    new_inits = {t.name for t in model.graph.initializer}
    for kind, ref_vals, new_vals in (
        ("input", [v for v in reference.graph.input if v.name not in ref_inits],
         [v for v in model.graph.input if v.name not in new_inits]),
        ("output", reference.graph.output, model.graph.output),
    ):
        ref_i, new_i = _interface(ref_vals), _interface(new_vals)
        if list(ref_i) != list(new_i):
            raise VerificationError(
                f"graph {kind}s changed: {list(ref_i)} -> {list(new_i)}")
        for name, (ref_t, ref_dims) in ref_i.items():
            new_t, new_dims = new_i[name]
            if ref_t != new_t:
                raise VerificationError(
                    f"graph {kind} {name!r} changed dtype "
                    f"{onnx.TensorProto.DataType.Name(ref_t)} -> {onnx.TensorProto.DataType.Name(new_t)}")
            if ref_dims != new_dims:
                raise VerificationError(f"graph {kind} {name!r} changed shape {ref_dims} -> {new_dims}")


class Verifier:
    """Runs the checks for a sequence of models against fixed sets of random inputs.

    The random feeds and each reference's outputs are computed once and reused, so a pass
    manager that verifies after every pass pays for one reference run per pass. When the
    batch is symbolic (and not fixed by --input-shape), a second feed at batch 2 catches
    rewrites that baked the batch size into a shape constant.
    """

    def __init__(self, reference: onnx.ModelProto, *, input_shapes: dict | None = None,
                 seed: int = 0, rtol: float = 1e-4, provider: str = "cpu",
                 feeds: dict[str, np.ndarray] | None = None):
        self.shapes = resolve_input_shapes(reference, input_shapes)
        self.feed_sets = [random_inputs(reference, self.shapes, seed=seed, feeds=feeds)]
        shapes2 = resolve_input_shapes(reference, input_shapes, batch=2)
        if shapes2 != self.shapes:
            self.feed_sets.append(random_inputs(reference, shapes2, seed=seed + 1, feeds=feeds))
        self.rtol = rtol
        self.provider = provider
        self.reference = reference
        self.reference_runs = self._run_all(reference, what="reference model")

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        return self.feed_sets[0]

    @property
    def reference_outputs(self) -> dict[str, np.ndarray]:
        """Outputs of the current reference on the first (batch-1) feeds."""
        return self.reference_runs[0]

    def _run_all(self, model: onnx.ModelProto, *, what: str) -> list[dict[str, np.ndarray]]:
        try:
            sess = make_session(model, provider=self.provider, threads=1)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types from C++
            raise VerificationError(f"ONNX Runtime cannot load the {what}: {_first_line(exc)}") from exc
        runs = []
        for feeds in self.feed_sets:
            try:
                runs.append(run_session(sess, feeds))
            except Exception as exc:
                batch = next(iter(feeds.values())).shape[:1]
                message = (f"ONNX Runtime cannot run the {what} at input batch {batch[0] if batch else '?'}: "
                           f"{_first_line(exc)}")
                if what == "reference model":  # the input model itself: not the rewrite's fault
                    raise ModelRunError(f"{message}; give inputs that need real values with "
                                        "--feed NAME=VALUE") from exc
                raise VerificationError(message) from exc
        return runs

    def run(self, model: onnx.ModelProto, *, what: str = "model") -> dict[str, np.ndarray]:
        """Run `model` on the first feeds, mapping runtime failures to VerificationError."""
        return self._run_all(model, what=what)[0]

    def verify(self, model: onnx.ModelProto, *, exact: bool, rtol: float | None = None,
               advance: bool = True) -> VerifyReport:
        """Verify `model` against the current reference; with `advance`, it becomes the reference."""
        rtol = self.rtol if rtol is None else rtol
        big = model.ByteSize() >= _CHECK_LIMIT
        if not big:
            check_structure(model)
        check_interface(self.reference, model)
        runs = self._run_all(model, what="rewritten model")
        report = VerifyReport(exact=exact, rtol=rtol)
        for ref_run, run in zip(self.reference_runs, runs):
            for name, ref in ref_run.items():
                got = run[name]
                if got.shape != ref.shape or got.dtype != ref.dtype:
                    raise VerificationError(
                        f"output {name!r} is {got.dtype}{list(got.shape)} at run time, "
                        f"expected {ref.dtype}{list(ref.shape)}")
                if got.dtype.kind == "f" and not np.all(np.isfinite(got)) and np.all(np.isfinite(ref)):
                    raise VerificationError(f"output {name!r} has non-finite values after the rewrite")
                if got.dtype.kind in "fc":
                    d = deviation(ref, got)
                elif not np.array_equal(ref, got):
                    d = OutputDeviation(float("inf"), float("inf"), 0.0)
                else:
                    d = OutputDeviation(0.0, 0.0, 1.0)
                prev = report.deviation.get(name)
                if prev is None or d.rel > prev.rel:
                    report.deviation[name] = d
        if exact:
            bad = {k: d for k, d in report.deviation.items() if not d.rel <= rtol}
            if bad:
                k, d = next(iter(bad.items()))
                raise VerificationError(
                    f"output {k!r} differs from the model before the pass: max abs error "
                    f"{d.max_abs:.3g}, relative {d.rel:.3g} > tolerance {rtol:g}")
        if advance:
            self.reference = model
            self.reference_runs = runs
        return report
