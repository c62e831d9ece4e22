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

from prunec.errors import OptionError, VerificationError
from prunec.graph.costs import CostReport, analyze_costs
from prunec.graph.fold import materialize_weights
from prunec.graph.ir import from_onnx, normalize, to_onnx
from prunec.graph.proof import first_difference, prove_masks
from prunec.graph.verify import Verifier, VerifyReport
from prunec.passes.base import Pass, PassContext, PassResult, get_pass, make_options


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


#: Called after each pass with (index, record, model after the pass).
PassHook = Callable[[int, PassRecord, onnx.ModelProto], None]


class PassManager:
    """Apply passes to a model, verifying after every one; nothing is written here.

    `rtol` is the exact tolerance (None: by the model's float precision, see
    `prunec.graph.verify.default_rtol`). With `keep_failed`, a model that fails verification is
    written there (with the proof's reference, if any) beside `failure.json` saying what failed."""

    def __init__(self, passes: list[Pass], *, ctx: PassContext | None = None, verify: bool = True,
                 rtol: float | None = None, on_pass: PassHook | None = None,
                 keep_failed: str | Path | None = None):
        self.passes = passes
        self.ctx = ctx or PassContext()
        self.verify = verify
        self.rtol = rtol
        self.on_pass = on_pass
        self.keep_failed = Path(keep_failed) if keep_failed else None

    def _calibration(self) -> dict[str, np.ndarray] | None:
        """Calibration arrays from the context: `ctx.calib.inputs`, else the --data arrays."""
        calib = getattr(self.ctx, "calib", None)
        arrays = getattr(calib, "inputs", None) if calib is not None else None
        return arrays if arrays else self.ctx.data

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, RunReport]:
        """Return the rewritten model and the report. Raises on the first failed verification."""
        shapes = self.ctx.input_shapes or None
        costs = analyze_costs(model, shapes)
        report = RunReport(before=Totals.of(costs), input_shapes=costs.input_shapes)
        verifier = Verifier(model, input_shapes=shapes, seed=self.ctx.seed, rtol=self.rtol,
                            calib=self._calibration(), feeds=self.ctx.feeds) if self.verify else None
        current = model
        graph = from_onnx(model)
        report.normalized = {k: v for k, v in materialize_weights(graph).items() if v}
        if report.normalized:  # what the first pass starts from (outputs equal the input's)
            current = to_onnx(normalize(graph), model)
        ctx = self.ctx
        ctx.baseline, ctx.kept, ctx.calib_users = None, {}, []  # run-scoped; the activation memo is not
        for i, p in enumerate(self.passes):
            if not p.exact and ctx.baseline is None:
                ctx.baseline = current  # recovery passes aim back at the model before the first loss
            before = Totals.of(costs)
            t0 = time.perf_counter()
            result = p.run(graph, self.ctx)
            seconds = time.perf_counter() - t0
            normalize(graph)
            candidate = to_onnx(graph, model)
            exact = p.exact or not result.changed
            check = None
            if verifier:
                check = self._verify(i, p, result, verifier, current, candidate, exact, model, shapes)
            result.reference = None  # a copy of the model: do not keep it for the whole run
            costs = analyze_costs(candidate, shapes)
            record = PassRecord(p.name, asdict(p.options), exact, result, before,
                                Totals.of(costs), check, seconds)
            report.passes.append(record)
            current = candidate
            if self.on_pass:
                self.on_pass(i, record, current)
            # The next pass starts from exactly what was verified.
            graph = from_onnx(current)
        report.after = Totals.of(costs)
        if ctx.calib is not None and ctx.calib_users:
            report.calibration = {"source": ctx.calib.source, "samples": ctx.calib.n,
                                  "independent": ctx.calib.independent, "used_by": list(ctx.calib_users),
                                  "views": ctx.calib.note}
        if verifier:
            report.final_deviation = {k: vars(d) for k, d in verifier.fidelity().items()}
            report.fidelity_on = verifier.fidelity_on
        return current, report

    def _verify(self, i: int, p: Pass, result: PassResult, verifier: Verifier, previous: onnx.ModelProto,
                candidate: onnx.ModelProto, exact: bool, template: onnx.ModelProto, shapes) -> VerifyReport:
        """Verify one pass's candidate (and prove it, if the pass says how); failures name the pass."""
        proof_model = locate = None
        try:
            if result.reference is not None and result.changed:
                ref_graph = normalize(result.reference.build())
                proof_model = to_onnx(ref_graph, template)
                kept, v = result.reference.kept, verifier

                def locate(feeds):
                    return first_difference(candidate, proof_model, kept, feeds, v.rtol, atol=v.atol,
                                            cos_tol=v.cos_tol)
            masks = None
            if result.masked_weights is not None and result.changed:
                masks = prove_masks(previous, candidate, result.masked_weights, input_shapes=shapes)
            check = verifier.verify(candidate, exact=exact, proof=proof_model,
                                    proof_what=result.reference.what if proof_model is not None else "",
                                    locate=locate, interface=result.interface)
            check.masks_proven = masks
            return check
        except VerificationError as exc:
            self._keep(i, p, exc, candidate, proof_model)
            raise VerificationError(f"pass {p.name!r} produced a model that fails verification: {exc}",
                                    details={"pass": p.name, **exc.details}) from exc

    def _keep(self, i: int, p: Pass, exc: VerificationError, candidate: onnx.ModelProto,
              reference: onnx.ModelProto | None) -> None:
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
