"""Budget allocation: per-group prune ratios that meet a MAC or parameter budget at the least
predicted metric drop, from a sensitivity table; plus the uniform ratio with the same budget.

Allocation is greedy on marginal cost: repeatedly raise the ratio of the group whose next step
loses the fewest points per MAC saved, so tolerant groups lose more and sensitive ones less.
Savings of groups pruned together are not additive (a conv between two pruned groups shrinks
on both sides), so the plan is then pruned for real and the target corrected until the
measured cost is within budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from prunec.errors import OptionError
from prunec.eval.sensitivity import SensitivityReport, prune, prune_uniform
from prunec.passes import PassContext

BUDGET_KINDS = ("macs", "params")


@dataclass
class Budget:
    """Keep at most `fraction` of the model's `kind` (macs or params)."""

    kind: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def parse_budget(text: str) -> Budget:
    """`macs=0.5` -> Budget('macs', 0.5)."""
    kind, eq, value = text.partition("=")
    kind = kind.strip().lower()
    if kind == "latency":
        raise OptionError("--budget latency=... is not supported yet (needs the latency profiler); "
                          "use macs= or params=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not eq or kind not in BUDGET_KINDS or not 0 < fraction < 1:
        raise OptionError(f"--budget {text!r}: expected macs=F or params=F with 0 < F < 1 "
                          "(the fraction of the original to keep)")
    return Budget(kind, fraction)


@dataclass
class Plan:
    """Per-group ratios and what they are predicted and measured to cost."""

    budget: Budget
    groups: dict[str, float]
    predicted_drop: float
    target: int
    original: int
    achieved: int
    iterations: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The plan file the `channels` pass reads (-O channels.plan=plan.json), with provenance."""
        return {"default_ratio": 0.0, "groups": {k: round(v, 4) for k, v in self.groups.items() if v > 0},
                "budget": {self.budget.kind: self.budget.fraction},
                "predicted_drop_points": round(self.predicted_drop, 4),
                self.budget.kind: {"original": self.original, "target": self.target, "achieved": self.achieved},
                "notes": self.notes}


def _curves(report: SensitivityReport, kind: str, step: float = 0.05):
    """Per group: candidate ratios (0, fine steps, measured) with interpolated drop and saving."""
    curves = {}
    for g in report.groups:
        if g.group.frozen or not g.trials:
            continue
        trials = sorted(g.trials, key=lambda t: t.ratio)
        xs = np.array([0.0] + [t.ratio for t in trials])
        # Pruning more is never assumed to help: take the running max of measured drops.
        drops = np.maximum.accumulate(np.array([0.0] + [max(t.drop, 0.0) for t in trials]))
        saves = np.maximum.accumulate(np.array([0.0] + [float(getattr(t, kind)) for t in trials]))
        grid = np.unique(np.concatenate([xs, np.arange(step, xs[-1], step)]))
        curves[g.group.id] = (grid, np.interp(grid, xs, drops), np.interp(grid, xs, saves))
    return curves


def _greedy(curves, need: float) -> tuple[dict[str, int], float, float]:
    """Raise one group a grid step at a time, cheapest points-per-saving first, until `need` is saved."""
    idx = {gid: 0 for gid in curves}
    saved = drop = 0.0
    while saved < need:
        best = None
        for gid, (grid, d, s) in curves.items():
            i = idx[gid]
            if i + 1 >= len(grid):
                continue
            # Look ahead to the next step that saves anything (flat steps cost nothing but help nothing).
            j = i + 1
            while j + 1 < len(grid) and s[j] <= s[i]:
                j += 1
            ds = s[j] - s[i]
            if ds <= 0:
                continue
            cost = (d[j] - d[i]) / ds
            if best is None or cost < best[0]:
                best = (cost, gid, j)
        if best is None:
            break
        _, gid, j = best
        grid, d, s = curves[gid]
        saved += s[j] - s[idx[gid]]
        drop += d[j] - d[idx[gid]]
        idx[gid] = j
    return idx, saved, drop


def allocate(model: onnx.ModelProto, report: SensitivityReport, budget: Budget, *,
             ctx: PassContext | None = None, options: dict[str, Any] | None = None,
             tolerance: float = 0.0, max_iter: int = 8) -> Plan:
    """A plan meeting `budget` (measured by pruning for real) with the least predicted drop."""
    original = report.macs if budget.kind == "macs" else report.params
    target = int(original * budget.fraction)
    curves = _curves(report, budget.kind)
    if not curves:
        raise OptionError("no prunable channel group was measured; nothing to allocate")
    need = float(original - target)
    notes = []
    for it in range(1, max_iter + 1):
        idx, saved, drop = _greedy(curves, need)
        ratios = {gid: float(curves[gid][0][i]) for gid, i in idx.items()}
        _, run = prune(model, {"default_ratio": 0.0, "groups": ratios}, ctx=ctx, options=options)
        achieved = run.after.macs if budget.kind == "macs" else run.after.params
        if achieved <= target * (1 + tolerance):
            return Plan(budget, ratios, drop, target, original, achieved, it, notes)
        if saved < need:
            raise OptionError(f"budget {budget} is out of reach with ratios up to {max(report.ratios):g}: "
                              f"the measured groups keep {achieved / original:.1%} at most; "
                              "measure larger --ratios")
        need += achieved - target  # combined pruning saved less than the sum; ask for more
    notes.append(f"stopped after {max_iter} corrections at {achieved / original:.1%} of the original")
    return Plan(budget, ratios, drop, target, original, achieved, max_iter, notes)


def uniform_for_budget(model: onnx.ModelProto, budget: Budget, *, ctx: PassContext | None = None,
                       options: dict[str, Any] | None = None, hi: float = 0.95, steps: int = 14
                       ) -> tuple[float, onnx.ModelProto, int]:
    """The smallest uniform ratio whose pruned model meets `budget` (bisection): (ratio, model, achieved)."""
    def cost(r):
        m, rep = prune_uniform(model, r, ctx=ctx, options=options)
        return m, (rep.after.macs if budget.kind == "macs" else rep.after.params), \
            (rep.before.macs if budget.kind == "macs" else rep.before.params)

    m_hi, c_hi, original = cost(hi)
    target = original * budget.fraction
    if c_hi > target:
        raise OptionError(f"budget {budget} is out of reach even at uniform ratio {hi}")
    lo, best = 0.0, (hi, m_hi, c_hi)
    for _ in range(steps):
        mid = (lo + best[0]) / 2
        m, c, _ = cost(mid)
        if c <= target:
            best = (mid, m, c)
        else:
            lo = mid
    return best
