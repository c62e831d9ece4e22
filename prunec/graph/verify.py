"""Proof that a rewritten model is still a valid, runnable, equivalent (or knowingly lossy) model.

Checks, in order, each failing with a `VerificationError` that names the check:
1. the full ONNX checker, 2. strict shape inference, 3. the interface (input/output names,
dtypes, dims; symbolic dims must stay symbolic), 4. an ONNX Runtime session loads it, 5. outputs
on deterministic random inputs (batch 1, and 2 where the batch is symbolic) and on calibration
samples when given: equal to the model before within the tolerance for exact rewrites, finite
(with the deviation measured) for lossy ones, and 6. for a lossy rewrite that comes with a
reference (`prunec.graph.proof`), equal to that reference within the exact tolerance.

The exact tolerance follows the model's least precise float type (`default_rtol`): float16 and
bfloat16 models cannot reproduce float32 rounding, and float64 ones can do much better. Outputs
also count as equal below that type's absolute rounding floor (`DEFAULT_ATOL`), or within 10x the
tolerance when pointing the same way (`DEFAULT_COS_TOL`): rounding amplified, not a wrong value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from prunec.errors import DataError, ModelLoadError, ModelRunError, VerificationError
from prunec.runtime.inputs import chosen_sizes, random_inputs, resolve_input_shapes, sample_batches
from prunec.runtime.session import ORT_ERRORS, make_session, run_session

_CHECK_LIMIT = 2**31 - 64 * 2**20

#: Exact tolerance (max abs error over max |reference|) by the least precise float type a model
#: computes in: float32 keeps prunec's long-standing 1e-4; float16 has 2^-11 relative rounding per
#: operation and bfloat16 2^-8, which a rewrite that reorders or fuses arithmetic (fold-bn) meets
#: layer after layer; float64 leaves room for 1e-9.
DEFAULT_RTOL = {onnx.TensorProto.DOUBLE: 1e-9, onnx.TensorProto.FLOAT: 1e-4,
                onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 5e-2}
#: Differences this small in absolute value count as rounding noise of values of order one,
#: whatever the relative error: an output that is ~0 everywhere (a saturated sigmoid on random
#: inputs: 1e-7 against 0) would otherwise fail any relative test.
DEFAULT_ATOL = {onnx.TensorProto.DOUBLE: 1e-12, onnx.TensorProto.FLOAT: 1e-6,
                onnx.TensorProto.FLOAT16: 1e-3, onnx.TensorProto.BFLOAT16: 1e-2}
#: Rounding noise can exceed the relative tolerance where a tensor's range shrinks after large
#: values (a Clip to [0, 6] after activations near 1000: 1.5e-6 relative before it, 1.3e-4
#: after, measured on PP-OCRv4 rec). Such a result still points the same way as the reference:
#: within 10x the tolerance and with 1 - cosine at most this, it counts as equal. A wrong
#: channel (a rule bug) moves the output by far more than rounding does.
DEFAULT_COS_TOL = {onnx.TensorProto.DOUBLE: 1e-14, onnx.TensorProto.FLOAT: 1e-8,
                   onnx.TensorProto.FLOAT16: 1e-4, onnx.TensorProto.BFLOAT16: 1e-3}
_LEAST_PRECISE_FIRST = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT,
                        onnx.TensorProto.DOUBLE)


def model_precision(model: onnx.ModelProto) -> int:
    """The least precise float type (an ONNX elem type) among a model's weights, Constant
    nodes, Cast targets, graph inputs and outputs; FLOAT when it has none of them."""
    # A weight stored in float16 but cast before use is not computed in float16.
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    cast_only = {name for name, ops in readers.items() if ops == {"Cast"}}
    seen: set[int] = {t.data_type for t in model.graph.initializer if t.name not in cast_only}
    seen |= {t.values.data_type for t in model.graph.sparse_initializer if t.values.name not in cast_only}
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            seen.add(vi.type.tensor_type.elem_type)
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR \
                    and node.output[0] not in cast_only:
                seen.add(a.t.data_type)
            elif node.op_type == "Cast" and a.name == "to":
                seen.add(a.i)
    return next((t for t in _LEAST_PRECISE_FIRST if t in seen), onnx.TensorProto.FLOAT)


def default_rtol(model: onnx.ModelProto) -> float:
    """The exact tolerance for `model`'s precision (see DEFAULT_RTOL)."""
    return DEFAULT_RTOL[model_precision(model)]


@dataclass
class OutputDeviation:
    """How far one output moved: max abs error, error relative to the reference's max magnitude."""

    max_abs: float
    rel: float
    cosine: float


class _Accumulator:
    """Deviation of one output over several batches, as if they were one array."""

    def __init__(self) -> None:
        self.max_abs = self.scale = self.dot = self.rr = self.gg = 0.0
        self.differs = False  # a non-float output that is not equal

    def add(self, ref: Any, got: Any) -> None:
        r, g = as_array(ref), as_array(got)
        if r.dtype.kind not in "fc" or g.dtype.kind not in "fc":
            self.differs |= r.shape != g.shape or not np.array_equal(r, g)
            return
        r = r.astype(np.float64, copy=False).ravel()
        g = g.astype(np.float64, copy=False).ravel()
        if r.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(r - g))))
            self.scale = max(self.scale, float(np.max(np.abs(r))))
        self.dot += float(r @ g)
        self.rr += float(r @ r)
        self.gg += float(g @ g)

    def result(self) -> OutputDeviation:
        if self.differs:
            return OutputDeviation(float("inf"), float("inf"), 0.0)
        rel = self.max_abs / self.scale if self.scale > 0 else self.max_abs
        nr, ng = np.sqrt(self.rr), np.sqrt(self.gg)
        cos = self.dot / (nr * ng) if nr > 0 and ng > 0 else float(nr == ng)
        return OutputDeviation(self.max_abs, rel, float(cos))


def deviation(ref: np.ndarray, got: np.ndarray) -> OutputDeviation:
    """Max abs error, max abs error over max |ref|, and cosine similarity of two arrays."""
    acc = _Accumulator()
    acc.add(ref, got)
    return acc.result()


def as_array(value: Any) -> np.ndarray:
    """An output as an array: tensors as they are; sequences and maps (a classifier's
    per-class probabilities) as arrays of their values, maps ordered by key."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        return np.asarray([as_array(value[k]) for k in sorted(value)])
    if isinstance(value, (list, tuple)):
        return np.asarray([as_array(v) for v in value]) if value else np.zeros(0)
    return np.asarray(value)


@dataclass
class ProofReport:
    """A lossy rewrite checked against its reference: what the reference was, the largest
    relative difference found, the tolerance, and the inputs it held on."""

    what: str
    max_rel: float
    rtol: float
    feeds: list[str]
    max_abs: float = 0.0
    min_cosine: float = 1.0
    #: An output agreed only by a rounding allowance, so every inner tensor was compared too.
    inner_checked: bool = False

    def to_dict(self) -> dict:
        return {"what": self.what, "max_rel": self.max_rel, "max_abs": self.max_abs,
                "min_cosine": self.min_cosine, "rtol": self.rtol, "feeds": self.feeds,
                "inner_checked": self.inner_checked}


@dataclass
class VerifyReport:
    """What verification found; `deviation` is per output, against the model before the
    rewrite, on `measured_on` (calibration samples when given, else the random inputs)."""

    exact: bool
    rtol: float
    deviation: dict[str, OutputDeviation] = field(default_factory=dict)
    measured_on: str = "random inputs"
    proof: ProofReport | None = None
    #: Weight-masking passes: how many written weights were proven to be masks of the old ones.
    masks_proven: int | None = None

    @property
    def max_rel(self) -> float:
        return max((d.rel for d in self.deviation.values()), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((d.cosine for d in self.deviation.values()), default=1.0)

    def to_dict(self) -> dict:
        return {"exact": self.exact, "rtol": self.rtol, "max_rel": self.max_rel,
                "min_cosine": self.min_cosine, "measured_on": self.measured_on,
                "outputs": {k: vars(v) for k, v in self.deviation.items()},
                "proof": self.proof.to_dict() if self.proof else None,
                "masks_proven": self.masks_proven}


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
        if not vi.type.HasField("tensor_type"):
            # Sequences and maps (a classifier's per-class scores): compared as a whole type.
            out[vi.name] = (-1, (str(vi.type).replace("\n", " "),))
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim) if tt.HasField("shape") else None
        out[vi.name] = (tt.elem_type, dims)
    return out


def check_interface(reference: onnx.ModelProto, model: onnx.ModelProto,
                    allowed: dict[str, dict[int, list[int]]] | None = None) -> None:
    """Inputs and outputs keep names, dtypes and dims; symbolic dims stay symbolic. `allowed`
    (name -> axis -> kept indices) lets those axes shrink to exactly the kept count."""
    allowed = allowed or {}
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
            if -1 in (ref_t, new_t) and (ref_t, ref_dims) != (new_t, new_dims):
                raise VerificationError(f"graph {kind} {name!r} changed type")
            if ref_t != new_t:
                raise VerificationError(
                    f"graph {kind} {name!r} changed dtype "
                    f"{onnx.TensorProto.DataType.Name(ref_t)} -> {onnx.TensorProto.DataType.Name(new_t)}")
            if name in allowed and ref_dims is not None and new_dims is not None \
                    and len(ref_dims) == len(new_dims):
                ref_dims = tuple(len(allowed[name][ax]) if ax in allowed[name] and isinstance(d, int) else d
                                 for ax, d in enumerate(ref_dims))
            if ref_dims != new_dims:
                raise VerificationError(f"graph {kind} {name!r} changed shape {ref_dims} -> {new_dims}")


@dataclass
class FeedSet:
    """Inputs every model is run on: a name for messages, and one or more batches of feeds."""

    name: str
    batches: list[dict[str, np.ndarray]]

    @property
    def samples(self) -> int:
        return sum(len(next(iter(b.values()))) if b else 0 for b in self.batches)


#: Outputs of one model: per feed set, per batch, by output name.
Runs = list[list[dict[str, Any]]]


class Verifier:
    """Runs the checks for a sequence of models against fixed sets of inputs.

    The feeds and each reference's outputs are computed once and reused, so a pass manager
    that verifies after every pass pays for one run of each candidate (and one of a lossy pass's
    proof reference). Feed sets: random inputs at batch 1; at batch 2 when the batch is symbolic
    (and not fixed by --input-shape), to catch rewrites that baked the batch size into a shape
    constant; and up to `calib_limit` calibration samples when `calib` arrays are given, on which
    fidelity is then measured. The original's outputs are kept for the fidelity of the end result.
    """

    def __init__(self, reference: onnx.ModelProto, *, input_shapes: dict | None = None,
                 seed: int = 0, rtol: float | None = None, provider: str = "cpu",
                 calib: dict[str, np.ndarray] | None = None, calib_limit: int = 64,
                 feeds: dict[str, np.ndarray] | None = None):
        self.shapes = resolve_input_shapes(reference, input_shapes)
        #: Symbolic dims prunec sized itself (named in errors: a size can be wrong for a model).
        self.chosen = chosen_sizes(reference, input_shapes)
        self.feed_sets = [FeedSet("random inputs at batch 1", [random_inputs(reference, self.shapes, seed=seed,
                                                                            feeds=feeds)])]
        # Batch 2, and half the size prunec chose for other symbolic dims (a sequence length).
        shapes2 = resolve_input_shapes(reference, input_shapes, batch=2, alternate=True)
        if shapes2 != self.shapes:
            self.feed_sets.append(FeedSet("random inputs at batch 2",
                                          [random_inputs(reference, shapes2, seed=seed + 1, feeds=feeds)]))
        batches = sample_batches(reference, calib, limit=calib_limit) if calib else []
        if batches:
            self.feed_sets.append(FeedSet("calibration samples", batches))
        #: Feed sets that fidelity is measured on: the calibration samples when there are any.
        self.fidelity_sets = [len(self.feed_sets) - 1] if batches else list(range(len(self.feed_sets)))
        self.rtol = default_rtol(reference) if rtol is None else rtol
        self.atol = DEFAULT_ATOL[model_precision(reference)]
        self.cos_tol = DEFAULT_COS_TOL[model_precision(reference)]
        self.provider = provider
        self.reference = reference
        self.reference_runs = self._run_all(reference, what="input model")
        self.original_runs = self.reference_runs

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        return self.feed_sets[0].batches[0]

    @property
    def reference_outputs(self) -> dict[str, np.ndarray]:
        """Outputs of the current reference on the first (batch-1) feeds."""
        return self.reference_runs[0][0]

    @property
    def fidelity_on(self) -> str:
        """What fidelity is measured on, for people: 'random inputs' or 'N calibration samples'."""
        if self.fidelity_sets == [len(self.feed_sets) - 1] and self.feed_sets[-1].name.startswith("calib"):
            return f"{self.feed_sets[-1].samples} calibration samples"
        return "random inputs"

    def _session(self, model: onnx.ModelProto, what: str):
        try:
            return make_session(model, provider=self.provider, threads=1)
        except ORT_ERRORS as exc:
            if what == "input model":
                raise ModelLoadError(f"ONNX Runtime cannot load the input model: {_first_line(exc)}") from exc
            raise VerificationError(f"ONNX Runtime cannot load the {what}: {_first_line(exc)}") from exc

    def _run_all(self, model: onnx.ModelProto, *, what: str, feed_sets: list[FeedSet] | None = None) -> Runs:
        sess = self._session(model, what)
        runs = []
        for fs in self.feed_sets if feed_sets is None else feed_sets:
            outs = []
            for feeds in fs.batches:
                try:
                    outs.append(run_session(sess, feeds))
                except ORT_ERRORS as exc:
                    msg = f"ONNX Runtime cannot run the {what} on {fs.name}: {_first_line(exc)}" + (
                        f" (prunec sized symbolic dims: {', '.join(f'{k}={v}' for k, v in self.chosen.items())}; "
                        "set them with --input-shape NAME=N)" if self.chosen and what == "input model" else "")
                    if what != "input model":
                        raise VerificationError(msg) from exc
                    if fs.name.startswith("calib"):
                        raise DataError(msg) from exc
                    raise ModelRunError(f"{msg}; give inputs that need real values with "
                                        "--feed NAME=VALUE") from exc
            runs.append(outs)
        return runs

    def run(self, model: onnx.ModelProto, *, what: str = "model") -> dict[str, np.ndarray]:
        """Run `model` on the first feeds, mapping runtime failures to VerificationError."""
        return self._run_all(model, what=what)[0][0]

    def compare(self, ref_runs: Runs, runs: Runs, sets: list[int] | None = None) -> dict[str, OutputDeviation]:
        """Deviation per output of `runs` from `ref_runs`, over the given feed sets (all by default)."""
        accs: dict[str, _Accumulator] = {}
        for k in (range(len(self.feed_sets)) if sets is None else sets):
            for ref_out, out in zip(ref_runs[k], runs[k]):
                for name, ref in ref_out.items():
                    accs.setdefault(name, _Accumulator()).add(ref, out[name])
        return {k: a.result() for k, a in accs.items()}

    def fidelity(self) -> dict[str, OutputDeviation]:
        """The current reference (the latest verified model) against the original."""
        return self.compare(self.original_runs, self.reference_runs, self.fidelity_sets)

    def verify(self, model: onnx.ModelProto, *, exact: bool, rtol: float | None = None,
               advance: bool = True, proof: onnx.ModelProto | None = None, proof_what: str = "reference",
               locate=None, interface: dict[str, dict[int, list[int]]] | None = None) -> VerifyReport:
        """Verify `model` against the current reference; with `advance`, it becomes the reference.

        With `proof`, `model` must also equal that model within the exact tolerance on every
        feed set; when it does not, `locate(feeds)` (if given) names the first differing tensor.
        `interface` (name -> axis -> kept indices) names inputs and outputs the rewrite was
        allowed to shrink: `model` runs on the feeds sliced that way, and its outputs are
        compared with the reference's (and the proof's) sliced the same way.
        """
        rtol = self.rtol if rtol is None else rtol
        big = model.ByteSize() >= _CHECK_LIMIT
        if not big:
            check_structure(model)
        check_interface(self.reference, model, interface)
        feed_sets = [FeedSet(fs.name, [slice_interface(b, interface) for b in fs.batches])
                     for fs in self.feed_sets] if interface else self.feed_sets
        runs = self._run_all(model, what="rewritten model", feed_sets=feed_sets)
        reference_runs = _sliced_runs(self.reference_runs, interface)
        for ref_set, run_set in zip(reference_runs, runs):
            for ref_out, out in zip(ref_set, run_set):
                for name, ref in ref_out.items():
                    _check_output(name, ref, out[name])
        report = VerifyReport(exact=exact, rtol=rtol, measured_on=self.fidelity_on)
        if exact:
            worst = self.compare(reference_runs, runs)
            bad = {k: d for k, d in worst.items() if not self._equal(d, rtol)}
            if bad:
                k, d = next(iter(bad.items()))
                raise VerificationError(
                    f"output {k!r} differs from the model before the pass: max abs error "
                    f"{d.max_abs:.3g}, relative {d.rel:.3g} > tolerance {rtol:g}"
                    f"{_tolerance_note(self.reference, rtol)}")
            report.deviation = worst
        else:
            report.deviation = self.compare(reference_runs, runs, self.fidelity_sets)
        if proof is not None:
            report.proof = self._prove(runs, proof, proof_what, rtol, locate, interface)
        if advance:
            self.reference = model
            self.reference_runs = runs
            if interface:  # later models see the new interface; the original is compared sliced
                self.feed_sets = feed_sets
                self.original_runs = _sliced_runs(self.original_runs, interface)
        return report

    def _equal(self, d: OutputDeviation, rtol: float) -> bool:
        """Equal within the exact tolerance: relative to the reference's magnitude, or below the
        absolute rounding floor of the model's precision, or (rounding amplified by a range
        that shrinks) within 10x the tolerance in the same direction (see DEFAULT_COS_TOL)."""
        return (d.rel <= rtol or d.max_abs <= self.atol
                or (d.rel <= 10 * rtol and 1.0 - d.cosine <= self.cos_tol))

    def _prove(self, runs: Runs, proof: onnx.ModelProto, what: str, rtol: float, locate,
               interface: dict | None = None) -> ProofReport:
        """The candidate's runs against the proof reference's, within the exact tolerance.

        An output that agrees only by a rounding allowance (near zero everywhere, or within 10x
        the tolerance in the same direction) proves little by itself (a saturated sigmoid hides
        whatever came before it), so then every inner tensor is compared too (`locate`)."""
        # The proof keeps the old interface: it runs on the full feeds, compared sliced.
        ref_runs = _sliced_runs(self._run_all(proof, what=f"{what} (a bug in prunec)"), interface)
        lenient = None
        for k, fs in enumerate(self.feed_sets):
            for b, (ref_out, out) in enumerate(zip(ref_runs[k], runs[k])):
                for name, ref in ref_out.items():
                    d = deviation(ref, out[name])
                    if d.rel <= rtol:
                        continue
                    if self._equal(d, rtol):
                        lenient = lenient or (fs, b, name)
                        continue
                    self._proof_failed(what, name, fs, d, rtol, locate(fs.batches[b]) if locate else None)
        inner_checked = False
        if lenient is not None and locate is not None:
            fs, b, name = lenient
            where = locate(self._one_sample(fs.batches[b]))
            if where:
                d = deviation(ref_runs[self.feed_sets.index(fs)][b][name], runs[self.feed_sets.index(fs)][b][name])
                self._proof_failed(what, name, fs, d, rtol, where)
            inner_checked = True
        worst = self.compare(ref_runs, runs)
        return ProofReport(what, max((d.rel for d in worst.values()), default=0.0), rtol,
                           [fs.name for fs in self.feed_sets],
                           max((d.max_abs for d in worst.values()), default=0.0),
                           min((d.cosine for d in worst.values()), default=1.0), inner_checked)

    def _one_sample(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The first sample of a batch when the model runs at batch 1 (a channel rule is wrong
        for every input alike, and every inner tensor of a big batch costs memory and time)."""
        if all(np.shape(v)[:1] == (1,) for v in self.feed_sets[0].batches[0].values()):
            return {k: v[:1] for k, v in feeds.items()}
        return feeds

    @staticmethod
    def _proof_failed(what: str, name: str, fs: FeedSet, d: OutputDeviation, rtol: float,
                      where: str | None) -> None:
        raise VerificationError(
            f"the rewrite does not match the {what} (a bug in a prunec rule): output "
            f"{name!r} on {fs.name} differs by {d.rel:.3g} relative (max abs {d.max_abs:.3g}) "
            f"> {rtol:g}" + (f"; first differing tensor: {where}" if where else ""),
            details={"check": "proof", "reference": what, "output": name, "feeds": fs.name,
                     "rel": d.rel, "max_abs": d.max_abs, "first_difference": where})


def slice_interface(values: dict[str, Any], interface: dict[str, dict[int, list[int]]] | None
                    ) -> dict[str, Any]:
    """`values` (feeds or outputs by name) with only the kept positions of changed interfaces."""
    out = dict(values)
    for name, axes in (interface or {}).items():
        if name in out:
            v = out[name]
            for ax, idx in axes.items():
                v = np.take(v, np.asarray(idx, dtype=np.int64), axis=int(ax))
            out[name] = v
    return out


def _sliced_runs(runs: Runs, interface: dict | None) -> Runs:
    return [[slice_interface(o, interface) for o in s] for s in runs] if interface else runs


def _check_output(name: str, ref: Any, got: Any) -> None:
    """Same kind, shape and dtype as before the rewrite, and finite where it was finite."""
    if not isinstance(ref, np.ndarray) or not isinstance(got, np.ndarray):
        if type(ref) is not type(got):
            raise VerificationError(f"output {name!r} is a {type(got).__name__} at run time, "
                                    f"expected a {type(ref).__name__}")
        return
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise VerificationError(
            f"output {name!r} is {got.dtype}{list(got.shape)} at run time, "
            f"expected {ref.dtype}{list(ref.shape)}")
    if got.dtype.kind == "f" and not np.all(np.isfinite(got)) and np.all(np.isfinite(ref)):
        raise VerificationError(f"output {name!r} has non-finite values after the rewrite")


def _tolerance_note(model: onnx.ModelProto, rtol: float) -> str:
    p = model_precision(model)
    if rtol == DEFAULT_RTOL[p]:
        return f" (the default for {onnx.TensorProto.DataType.Name(p).lower()} models; --rtol sets it)"
    return ""
