"""Budget allocation: per-group prune ratios that meet a MAC, parameter or latency budget at the
least predicted metric drop, from a sensitivity table; plus the uniform ratio with the same budget.

A latency budget is steered by MACs (the sensitivity table's savings) and stopped by measured
latency: each candidate plan is timed against the original, interleaved in one process, on the
chosen target (runtime, provider or device) and batch size.

Allocation is greedy on marginal cost: repeatedly raise the ratio of the group whose next step
loses the fewest points per MAC saved, so tolerant groups lose more and sensitive ones less.
Savings of groups pruned together are not additive (a conv between two pruned groups shrinks
on both sides), so the plan is then pruned for real and the target corrected until the
measured cost is within budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import math

import numpy as np
import onnx

from prunec.errors import OptionError
from prunec.eval.sensitivity import SensitivityReport, prune, prune_uniform
from prunec.passes import PassContext

BUDGET_KINDS = ("macs", "params", "latency")


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
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not eq or kind not in BUDGET_KINDS or not 0 < fraction < 1:
        raise OptionError(f"--budget {text!r}: expected macs=F, params=F or latency=F with 0 < F < 1 "
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
    #: The channels pass's `round` the plan was measured with; the plan file carries it so
    #: that running the plan reproduces `achieved`.
    round: int | None = None

    def to_dict(self) -> dict:
        """The plan file the `channels` pass reads (-O channels.plan=plan.json), with provenance."""
        # Ratios are k/size exactly (not rounded) so the pass removes exactly k channels.
        extra = {"round": self.round} if self.round is not None else {}
        return {"default_ratio": 0.0, "groups": {k: v for k, v in self.groups.items() if v > 0}, **extra,
                "budget": {self.budget.kind: self.budget.fraction},
                "predicted_drop_points": round(float(self.predicted_drop), 4),
                self.budget.kind: {"original": self.original, "target": self.target, "achieved": self.achieved}}


def _curves(report: SensitivityReport, kind: str):
    """Per group: candidate ratios k/size (k channels removed, up to the largest measured) with
    drop and saving interpolated in k between the measured points."""
    curves = {}
    for g in report.groups:
        if g.group.frozen or not g.trials:
            continue
        n = g.group.size
        trials = sorted(g.trials, key=lambda t: t.ratio)
        ks = np.array([0] + [math.floor(n * t.ratio + 1e-9) for t in trials], dtype=float)
        # Pruning more is never assumed to help: take the running max of measured drops.
        drops = np.maximum.accumulate(np.array([0.0] + [max(t.drop, 0.0) for t in trials]))
        saves = np.maximum.accumulate(np.array([0.0] + [float(getattr(t, kind)) for t in trials]))
        grid = np.arange(0, int(ks[-1]) + 1, dtype=float)
        if len(grid) < 2:
            continue  # too small to lose a channel at the measured ratios
        curves[g.group.id] = (grid / n, np.interp(grid, ks, drops), np.interp(grid, ks, saves))
    return curves


def _greedy(curves, idx: dict[str, int], need: float) -> tuple[float, float]:
    """Raise groups a step at a time from `idx` (updated in place), cheapest points per saving
    first, until `need` more is saved (estimated). Returns (estimated saving, estimated drop added)."""
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
    return saved, drop


@dataclass
class LatencySettings:
    """Where and how a latency budget is measured: `target` (a prunec.runtime.target.Target)
    when given, else ONNX Runtime on `provider` with `threads`."""

    provider: str = "cpu"
    batch: int = 1
    threads: int | None = None
    seconds: float = 1.0
    target: Any = None


#: (original model, candidate model) -> (candidate latency / original latency, original ms).
LatencyMeter = Callable[[onnx.ModelProto, onnx.ModelProto], tuple[float, float]]


def measured_latency(settings: LatencySettings, input_shapes: dict | None = None,
                     feeds: dict | None = None) -> LatencyMeter:
    """A meter timing both models interleaved in one process (the profiler's compare)."""
    from prunec.eval.profile import compare_models

    def meter(original: onnx.ModelProto, candidate: onnx.ModelProto) -> tuple[float, float]:
        cmp = compare_models(original, candidate, provider=settings.provider, batches=(settings.batch,),
                             threads=settings.threads, input_shapes=input_shapes, seconds=settings.seconds,
                             ops=False, memory=False, target=settings.target, feeds=feeds)
        return 1.0 / cmp.speedups[0].speedup, cmp.before.at(settings.batch).p50_ms

    return meter


def allocate(model: onnx.ModelProto, report: SensitivityReport, budget: Budget, *,
             ctx: PassContext | None = None, options: dict[str, Any] | None = None,
             max_iter: int = 50, latency: LatencyMeter | None = None) -> Plan:
    """A plan meeting `budget` (measured by pruning for real) with the least predicted drop.

    Greedy on the single-group measurements first; then, while the real pruned model is still
    over budget, continue the same greedy order by the measured shortfall. For a latency
    budget, `latency` measures candidates (default: `measured_latency` on CPU, batch 1), and
    costs in the plan are microseconds.
    """
    timed = budget.kind == "latency"
    if timed and latency is None:
        latency = measured_latency(LatencySettings(), ctx.input_shapes if ctx else None)
    steer = "macs" if timed else budget.kind
    original = report.macs if steer == "macs" else report.params
    target = int(original * budget.fraction)
    curves = _curves(report, steer)
    if not curves:
        raise OptionError("no prunable channel group was measured; nothing to allocate")
    idx = {gid: 0 for gid in curves}
    need = float(original - target)
    drop = 0.0
    for it in range(1, max_iter + 1):
        before = dict(idx)
        drop += _greedy(curves, idx, need)[1]
        ratios = {gid: float(curves[gid][0][i]) for gid, i in idx.items()}
        pruned, run = prune(model, {"default_ratio": 0.0, "groups": ratios}, ctx=ctx, options=options)
        used = run.passes[0].result.details.get("round") if run.passes else None
        if timed:
            fraction, base_ms = latency(model, pruned)
            cost = (int(base_ms * 1000), int(base_ms * 1000 * budget.fraction), int(base_ms * 1000 * fraction))
            if fraction <= budget.fraction:
                return Plan(budget, ratios, drop, cost[1], cost[0], cost[2], it, used)
            # Still too slow: ask for the MACs that the measured shortfall corresponds to.
            shortfall = run.after.macs * (fraction - budget.fraction) / fraction
            achieved_share = fraction
        else:
            achieved = run.after.macs if steer == "macs" else run.after.params
            if achieved <= target:
                return Plan(budget, ratios, drop, target, original, achieved, it, used)
            # Groups pruned together save less than the sum of their single-group savings.
            shortfall = float(achieved - target)
            achieved_share = achieved / original
        if idx == before and it > 1:
            raise OptionError(f"budget {budget} is out of reach with ratios up to {max(report.ratios):g}: "
                              f"the measured groups keep {achieved_share:.1%} at most; "
                              "measure larger --ratios")
        need = max(shortfall, 1.0)
    raise OptionError(f"budget {budget}: no plan within budget after {max_iter} corrections "
                      f"({achieved_share:.1%} of the original); measure finer --ratios")


def uniform_for_budget(model: onnx.ModelProto, budget: Budget, *, ctx: PassContext | None = None,
                       options: dict[str, Any] | None = None, hi: float = 0.95, steps: int = 14
                       ) -> tuple[float, onnx.ModelProto, int]:
    """The smallest uniform ratio whose pruned model meets `budget` (bisection): (ratio, model, achieved)."""
    if budget.kind not in ("macs", "params"):
        raise OptionError(f"uniform_for_budget takes a macs or params budget, not {budget}")

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
