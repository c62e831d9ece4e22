"""Prune potential (after "Lost in Pruning", MLSys 2021): the largest prune ratio whose metric
stays within δ points of the original, on clean data and on each corruption separately.

A model's safe ratio on clean data often overstates its safe ratio on degraded inputs; this
sweep shows both side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import onnx

from prunec.errors import OptionError
from prunec.eval.budget import Budget, allocate
from prunec.eval.executor import ExecutorSettings
from prunec.eval.gate import Evaluator
from prunec.eval.sensitivity import SensitivityReport, run_trials
from prunec.eval.trials import TrialGraph
from prunec.graph.costs import analyze_costs
from prunec.passes import PassContext


@dataclass
class PotentialReport:
    """Metric per ratio and input variant, and each variant's prune potential."""

    metric: str
    delta: float
    ratios: list[float]
    variants: list[str]
    baseline: dict[str, float]
    values: dict[str, list[float]]  # variant -> metric at each ratio
    macs: list[int]  # MACs of the pruned model at each ratio
    original_macs: int
    potential: dict[str, float]
    #: "uniform": ratios are per-group channel ratios; "planned": ratios are the fraction of MACs
    #: removed by a sensitivity-based budget plan.
    mode: str = "uniform"

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def potential_of(ratios: list[float], baseline: float, values: list[float], delta: float) -> float:
    """Largest ratio r such that the metric at every swept ratio up to r is within `delta` of `baseline` (0 if none)."""
    best = 0.0
    for r, v in sorted(zip(ratios, values)):
        if v < baseline - delta - 1e-9:
            break
        best = r
    return best


def prune_potential(model: onnx.ModelProto, evaluator: Evaluator, ratios: list[float], *, delta: float = 0.5,
                    ctx: PassContext | None = None, options: dict[str, Any] | None = None,
                    sensitivity: SensitivityReport | None = None,
                    progress: Callable[[int, int, str], None] | None = None,
                    executor: ExecutorSettings | None = None) -> PotentialReport:
    """Sweep pruning strength and measure the metric on every input variant of `evaluator`.

    Without `sensitivity`, each ratio is a uniform `channels` ratio. With it, each ratio r is a
    MAC budget: the sensitivity plan that removes a fraction r of the MACs (mode "planned").
    Each point is a masked trial (`prunec.eval.trials`), spread by `executor`.
    """
    variants = list(evaluator.variants)
    baseline = {v: evaluator.reference_value(v) for v in variants}
    original = analyze_costs(model, (ctx.input_shapes if ctx else None) or None).macs
    tg = TrialGraph(model, input_shapes=ctx.input_shapes if ctx else None, options=options)
    swept, macs, trials, plans = [], [], {}, {}
    for r in ratios:
        if sensitivity is None:
            removed = tg.select({}, ctx, default=r)
            plans[f"{r:g}"] = {"default_ratio": r, "groups": {}}
        else:
            try:
                plan = allocate(model, sensitivity, Budget("macs", 1 - r), ctx=ctx, options=options, trials=tg)
            except OptionError:
                break  # out of reach with the measured ratios; the sweep ends here
            removed = tg.select(plan.groups, ctx)
            plans[f"{r:g}"] = {"default_ratio": 0.0, "groups": dict(plan.groups)}
        swept.append(r)
        macs.append(tg.costs(removed)[1])
        trials[f"{r:g}"] = removed
    measured: dict[str, dict[str, float]] = {}

    def finish(key: str, values: dict[str, float]) -> None:
        measured[key] = values
        if progress:
            progress(len(measured), len(ratios), f"ratio {key}")

    run_trials(tg, model, evaluator, trials, finish, plans=plans, ctx=ctx, options=options, variants=variants,
               executor=executor)
    values = {v: [measured[f"{r:g}"][v] for r in swept] for v in variants}
    pot = {v: potential_of(swept, baseline[v], values[v], delta) for v in variants}
    return PotentialReport(evaluator.metric, delta, swept, variants, baseline, values, macs, original, pot,
                           "uniform" if sensitivity is None else "planned")
