"""Runs passes in order, verifying after each one; owns error context, costs and timing.

A pass only edits the graph and says what it changed. The manager restores graph invariants,
exports, verifies (exact or lossy, as the pass declares) and counts costs before and after, so
a failure always names the pass that caused it and a successful run has numbers for each step.
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
from prunec.graph.ir import from_onnx, normalize, to_onnx
from prunec.graph.verify import Verifier, VerifyReport, deviation
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
    final_deviation: dict[str, dict] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Which calibration data passes ran on (source, samples, independent, used_by), if any.
    calibration: dict | None = None

    def to_dict(self) -> dict:
        return {
            "before": asdict(self.before) if self.before else None,
            "after": asdict(self.after) if self.after else None,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "passes": [p.to_dict() for p in self.passes],
            "final_deviation": self.final_deviation,
            "calibration": self.calibration,
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
    """Apply passes to a model, verifying after every one; nothing is written here."""

    def __init__(self, passes: list[Pass], *, ctx: PassContext | None = None, verify: bool = True,
                 rtol: float = 1e-4, on_pass: PassHook | None = None):
        self.passes = passes
        self.ctx = ctx or PassContext()
        self.verify = verify
        self.rtol = rtol
        self.on_pass = on_pass

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, RunReport]:
        """Return the rewritten model and the report. Raises on the first failed verification."""
        shapes = self.ctx.input_shapes or None
        costs = analyze_costs(model, shapes)
        report = RunReport(before=Totals.of(costs), input_shapes=costs.input_shapes)
        verifier = Verifier(model, input_shapes=shapes, seed=self.ctx.seed, rtol=self.rtol) \
            if self.verify else None
        original_outputs = verifier.reference_outputs if verifier else None
        current = model
        graph = from_onnx(model)
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
            check = None
            if verifier:
                try:
                    check = verifier.verify(candidate, exact=p.exact)
                except VerificationError as exc:
                    raise VerificationError(
                        f"pass {p.name!r} produced a model that fails verification: {exc}") from exc
            costs = analyze_costs(candidate, shapes)
            record = PassRecord(p.name, asdict(p.options), p.exact, result, before,
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
        if verifier and original_outputs is not None:
            final = verifier.reference_outputs
            report.final_deviation = {k: vars(deviation(v, final[k])) for k, v in original_outputs.items()}
        return current, report


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
