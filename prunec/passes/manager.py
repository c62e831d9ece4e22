"""Runs passes in order, verifying after each one; owns error context, costs and timing.

A pass only edits the graph and says what it changed. The manager normalises weights once
(Constant nodes, Identity and Cast of constants become initializers), restores graph invariants,
exports, verifies (exact or lossy, as the pass declares) and counts costs before and after, so
a failure always names the pass that caused it and a successful run has numbers for each step.
A lossy pass is proven, not only run: against the reference model it returns (`channels`: the
masked original), or, for weight-masking passes, by checking each written weight is a mask of the
old one and the graph diff shows nothing else changed. A lossy pass that reports no change is
verified as exact. The fidelity of the result to the original (per output) is in the report.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.errors import OptionError, VerificationError
from prunec.graph.costs import CostReport, analyze_costs
from prunec.graph.fold import fold_constants, materialize_weights
from prunec.graph.io import LoadedModel
from prunec.graph.ir import from_onnx, model_template, normalize
from prunec.graph.proof import first_difference, prove_masks
from prunec.graph.store import ModelFile, Store, strip
from prunec.graph.verify import Verifier, VerifyReport
from prunec.passes.base import Pass, PassContext, PassResult, get_pass, make_options
from prunec.runtime import heap


@dataclass
class Totals:
    """The headline numbers of a model."""

    nodes: int
    params: int
    macs: int

    @classmethod
    def of(cls, costs: CostReport) -> "Totals":
        return cls(costs.nodes, costs.params, costs.macs)


@dataclass
class PassRecord:
    """One executed pass: options, its own result, costs around it, verification, time."""

    name: str
    options: dict[str, Any]
    exact: bool
    result: PassResult
    before: Totals
    after: Totals
    verification: VerifyReport | None
    seconds: float

    def to_dict(self) -> dict:
        return {
            "name": self.name, "options": _jsonable(self.options), "exact": self.exact,
            "changed": self.result.changed, "details": _jsonable(self.result.details),
            "skipped": [asdict(s) for s in self.result.skipped],
            "notes": list(self.result.notes), "interface": _jsonable(self.result.interface),
            "before": asdict(self.before), "after": asdict(self.after),
            "verification": self.verification.to_dict() if self.verification else None,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class RunReport:
    """The whole run: every pass, and the final model against the original."""

    passes: list[PassRecord] = field(default_factory=list)
    before: Totals | None = None
    after: Totals | None = None
    #: Fidelity of the result to the original, per output (max_abs, rel, cosine).
    final_deviation: dict[str, dict] = field(default_factory=dict)
    #: What the fidelity was measured on: "random inputs" or "N calibration samples".
    fidelity_on: str = "random inputs"
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Which calibration data passes ran on (source, samples, independent, used_by), if any.
    calibration: dict | None = None
    #: Weights made initializers before the passes ran, by where they were (see materialize_weights).
    normalized: dict[str, int] = field(default_factory=dict)
    #: --min-cosine/--max-deviation failures that --force wrote anyway.
    fidelity_forced: list[str] = field(default_factory=list)

    @property
    def lossy(self) -> bool:
        """True when a lossy pass changed the model."""
        return any(not p.exact and p.result.changed for p in self.passes)

    @property
    def changed(self) -> bool:
        return any(p.result.changed for p in self.passes)

    def fidelity_failures(self, min_cosine: float | None, max_deviation: float | None) -> list[str]:
        """Outputs whose fidelity to the original misses a threshold, as messages."""
        out = []
        for name, d in self.final_deviation.items():
            if min_cosine is not None and not d["cosine"] >= min_cosine:
                out.append(f"output {name!r}: cosine {d['cosine']:.4g} < --min-cosine {min_cosine:g}")
            if max_deviation is not None and not d["rel"] <= max_deviation:
                out.append(f"output {name!r}: relative deviation {d['rel']:.3g} > --max-deviation {max_deviation:g}")
        return out

    def to_dict(self) -> dict:
        return {
            "before": asdict(self.before) if self.before else None,
            "after": asdict(self.after) if self.after else None,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "normalized": self.normalized,
            "passes": [p.to_dict() for p in self.passes],
            "final_deviation": self.final_deviation,
            "calibration": self.calibration,
            "fidelity_on": self.fidelity_on,
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    return obj


#: Called after each pass with (index, record, model after the pass: a ModelFile in the run's store).
PassHook = Callable[[int, PassRecord, ModelFile], None]


def _fold(graph: gs.Graph, ctx: PassContext) -> None:
    fold_constants(graph, ctx.input_shapes or None)


#: Conditions a pass may require of the graph (Pass.requires), and how the manager establishes
#: each: "folded" = constant subgraphs and static shape arithmetic folded at the run's input shapes.
CONDITIONS: dict[str, Callable[[gs.Graph, PassContext], None]] = {"folded": _fold}


class PassManager:
    """Apply passes to a model, verifying after every one; nothing is written here.

    One graph travels through the run: the model is imported once (its weights taken out of the
    protobuf, so they are held once), each pass edits the graph, and its result is exported once
    into the run's store (`prunec.graph.store`), from which the checker, shape inference, ONNX
    Runtime, the proof and finally the output file all read it. A pass whose result is identical
    to the model verified before it (same graph, same weight bytes) is not verified again.

    `rtol` is the exact tolerance (None: by the model's float precision, see
    `prunec.graph.verify.default_rtol`). With `keep_failed`, a model that fails verification is
    written there (with the proof's reference, if any) beside `failure.json` saying what failed.
    `workdir` is where the run's store goes (default: the system temp folder)."""

    def __init__(self, passes: list[Pass], *, ctx: PassContext | None = None, verify: bool = True,
                 rtol: float | None = None, on_pass: PassHook | None = None,
                 keep_failed: str | Path | None = None, workdir: str | Path | None = None):
        self.passes = passes
        self.ctx = ctx or PassContext()
        self.verify = verify
        self.rtol = rtol
        self.on_pass = on_pass
        self.keep_failed = Path(keep_failed) if keep_failed else None
        self.workdir = workdir

    def _calibration(self) -> dict[str, np.ndarray] | None:
        """Calibration arrays from the context: `ctx.calib.inputs`, else the --data arrays."""
        calib = getattr(self.ctx, "calib", None)
        arrays = getattr(calib, "inputs", None) if calib is not None else None
        return arrays if arrays else self.ctx.data

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, RunReport]:
        """Return the rewritten model and the report. Raises on the first failed verification."""
        with Store(self.workdir) as store:
            result, report = self.run_in(store, model)
            return result.load(), report

    def run_in(self, store: Store, model: onnx.ModelProto | LoadedModel) -> tuple[ModelFile, RunReport]:
        """`run`, with the result left in `store` (save it with `prunec.graph.io.save_model`,
        which streams its weights). Given a LoadedModel, the run takes its protobuf over
        (`LoadedModel.release`), or reads the weights of its skeleton from their files, and ONNX
        Runtime opens the input file itself."""
        path = base = None
        if isinstance(model, LoadedModel):
            path = model.path if model.converted_from_opset is None else None
            if model.skeleton is not None:  # its weights are read from their files into the graph
                model, base = model.skeleton, model.path.parent
                files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
                size = sum((base / f).stat().st_size for f in files)  # checked by load_model: they exist
            else:
                model = model.release()
        if base is None:
            size = model.ByteSize()
        # Collecting cycles and trimming the heap costs a full garbage collection (50 ms in a
        # process with many objects, which a sensitivity sweep of small runs pays per trial); it
        # is worth that only where the memory it may give back is large.
        trim = self._trim = heap.trim if size >= heap.TRIM_MIN_BYTES else (lambda: None)
        shapes = self.ctx.input_shapes or None
        costs = analyze_costs(model, shapes, base_dir=base)
        report = RunReport(before=Totals.of(costs), input_shapes=costs.input_shapes)
        template = model_template(model)

        def verifier_of(model):
            return Verifier(model, input_shapes=shapes, seed=self.ctx.seed, rtol=self.rtol, calib=self._calibration(),
                            feeds=self.ctx.feeds, path=path) if self.verify else None

        if base is not None:
            # No weights are held yet: ONNX Runtime's copy of the input is freed before the
            # graph reads them.
            verifier = verifier_of(strip(model))
            trim()
            graph = from_onnx(model, own_weights=True, base_dir=base)
        else:
            graph = from_onnx(model, own_weights=True)
            if path is not None:
                # The graph holds the weights now: the input's protobuf is freed before ONNX
                # Runtime reads the input file for the original's outputs.
                model = strip(model)
                trim()
            verifier = verifier_of(model)
        del model
        report.normalized = {k: v for k, v in materialize_weights(graph).items() if v}
        ctx = self.ctx
        ctx.holds = set()
        ctx.baseline, ctx.kept, ctx.calib_users = None, {}, []  # run-scoped; the activation memo is not
        normalize(graph)
        current: ModelFile | None = None  # the model the next pass starts from, once exported
        verified = False  # whether `current` is the verifier's reference
        costed = False  # whether `costs` are `current`'s (at first they are the input file's)
        for i, p in enumerate(self.passes):
            for cond in sorted(p.requires() - ctx.holds):
                CONDITIONS[cond](graph, ctx)
                ctx.holds.add(cond)
            # A weight-masking pass's proof reads the model before it, and so may a recovery
            # pass read the model before the first lossy pass.
            if current is None and (p.masks_weights or not p.exact):
                current = store.export(graph, template, "input")
            if not p.exact and ctx._baseline is None:  # (reading ctx.baseline would load it)
                ctx.baseline = current  # a file in the store, read only if a pass asks for it
            before = Totals.of(costs)
            t0 = time.perf_counter()
            result = p.run(graph, ctx)
            seconds = time.perf_counter() - t0
            normalize(graph)
            # graphsurgeon's tensors and nodes refer to each other, so the weights a pass replaced
            # are freed only by the cycle collector, which array allocations do not trigger.
            trim()
            candidate = store.export(graph, template, p.name)
            exact = p.exact or not result.changed
            same = verified and _same_model(current, candidate)
            check = None
            if same:
                candidate = current
                check = verifier.unchanged(exact) if verifier else None
            else:
                ctx.holds &= p.preserves
                if verifier:
                    check = self._verify(i, p, result, verifier, current, candidate, exact, template, store, shapes)
                # A pass that changed weight values only keeps the costs: a weight-masking pass
                # whose proof showed nothing else changed, or one whose result differs from the
                # model before it in the bytes of stored weights alone.
                masks_only = check is not None and check.masks_proven is not None
                if not (costed and (masks_only or _same_shapes(current, candidate))):
                    costs = analyze_costs(candidate.skeleton, shapes, base_dir=candidate.path.parent)
            result.reference = None  # a copy of the model: do not keep it for the whole run
            record = PassRecord(p.name, asdict(p.options), exact, result, before,
                                Totals.of(costs), check, seconds)
            report.passes.append(record)
            current, verified, costed = candidate, verifier is not None, True
            if self.on_pass:
                self.on_pass(i, record, current)
        report.after = Totals.of(costs)
        if ctx.calib is not None and ctx.calib_users:
            report.calibration = {"source": ctx.calib.source, "samples": ctx.calib.n,
                                  "independent": ctx.calib.independent, "used_by": list(ctx.calib_users),
                                  "views": ctx.calib.note}
        if verifier:
            report.final_deviation = {k: vars(d) for k, d in verifier.fidelity().items()}
            report.fidelity_on = verifier.fidelity_on
        return current, report

    def _verify(self, i: int, p: Pass, result: PassResult, verifier: Verifier, previous: ModelFile | None,
                candidate: ModelFile, exact: bool, template: onnx.ModelProto, store: Store, shapes) -> VerifyReport:
        """Verify one pass's candidate (and prove it, if the pass says how); failures name the pass."""
        proof_model = locate = None
        what = ""
        try:
            if result.reference is not None and result.changed:
                ref, result.reference = result.reference, None
                kept, what, v = ref.kept, ref.what, verifier
                proof_model = store.export(normalize(ref.build()), template, f"{p.name}-reference")
                del ref  # its zeroed weights are in the store now
                self._trim()

                def locate(feeds):
                    return first_difference(candidate, proof_model, kept, feeds, v.rtol, atol=v.atol,
                                            cos_tol=v.cos_tol)
            masks = None
            if result.masked_weights is not None and result.changed:
                if previous is None:  # a bug in the pass, not in the user's input
                    raise TypeError(f"pass {p.name!r} returned masked_weights without declaring "
                                    "masks_weights = True, so the model before it was not kept")
                masks = prove_masks(previous.load(), candidate.load(), result.masked_weights, input_shapes=shapes)
            check = verifier.verify(candidate, exact=exact, proof=proof_model,
                                    proof_what=what,
                                    locate=locate, interface=result.interface)
            check.masks_proven = masks
            return check
        except VerificationError as exc:
            self._keep(i, p, exc, candidate, proof_model)
            raise VerificationError(f"pass {p.name!r} produced a model that fails verification: {exc}",
                                    details={"pass": p.name, **exc.details}) from exc

    def _keep(self, i: int, p: Pass, exc: VerificationError, candidate: ModelFile,
              reference: ModelFile | None) -> None:
        """--keep-failed: the failing candidate, the proof's reference, and what failed."""
        if self.keep_failed is None:
            return
        import json

        from prunec.graph.io import save_model

        self.keep_failed.mkdir(parents=True, exist_ok=True)
        stem = f"{i + 1:02d}-{p.name}"
        files = {"candidate": f"{stem}-failed.onnx"}
        save_model(candidate, self.keep_failed / files["candidate"])
        if reference is not None:
            files["reference"] = f"{stem}-reference.onnx"
            save_model(reference, self.keep_failed / files["reference"])
        doc = {"pass": p.name, "index": i, "options": _jsonable(asdict(p.options)), "error": str(exc),
               "details": _jsonable(exc.details), "files": files}
        (self.keep_failed / "failure.json").write_text(json.dumps(doc, indent=2))


def _same_shapes(a: ModelFile, b: ModelFile) -> bool:
    """Whether two models differ at most in the values of weights kept in the store's data file:
    then every tensor has the same shape, and costs (nodes, parameters, MACs) are the same. A
    weight small enough to stay in the skeleton may be a shape (a Reshape target) and counts."""
    def structure(m: ModelFile) -> bytes:
        s = onnx.ModelProto()
        s.CopyFrom(m.skeleton)
        for t in s.graph.initializer:
            del t.external_data[:]
        return s.SerializeToString(deterministic=True)

    return structure(a) == structure(b)


def _same_model(a: ModelFile, b: ModelFile) -> bool:
    """Whether two models in one store are the same model: equal skeletons, which include where
    each external weight's bytes are (a store writes an array once and never edits it)."""
    return a.skeleton.SerializeToString(deterministic=True) == b.skeleton.SerializeToString(deterministic=True)


def build_passes(names: list[str], option_values: dict[str, dict[str, Any]]) -> list[Pass]:
    """Instantiate passes by name with their options; options for passes not chosen are errors."""
    stray = sorted(set(option_values) - set(names))
    if stray:
        raise OptionError(f"options given for pass(es) that are not being run: {', '.join(stray)}; "
                          f"passes run: {', '.join(names)}")
    passes = []
    for name in names:
        cls = get_pass(name)
        passes.append(cls(make_options(cls, option_values.get(name, {}))))
    return passes


def load_recipe(path: str | Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Read a TOML recipe: `passes = [...]` and one table of options per pass."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise OptionError(f"recipe {p}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptionError(f"recipe {p}: not valid TOML: {exc}") from None
    names = data.pop("passes", None)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise OptionError(f"recipe {p}: needs passes = [\"pass-a\", \"pass-b\"]")
    options: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            raise OptionError(f"recipe {p}: top-level key {key!r} must be a table of options "
                              f"for pass {key!r} ([{key}])")
        options[key] = value
    return names, options


def parse_pass_list(text: str) -> list[str]:
    """Split `a,b,c` into pass names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise OptionError("--passes is empty; name at least one pass")
    return names
