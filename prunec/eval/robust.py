"""Robustness in selection and planning: score a candidate on every gated input variant.

Sensitivity and the plans built from it used to measure clean data only, so a group whose loss
shows only on degraded inputs looked free. Here a candidate is scored on each variant of the
evaluator (clean and every corruption at the gated severity) and its drop is the worst one
among the variants the gate would judge: a corruption where the original itself is within the
chance margin is reported, not counted (a pruned model cannot be judged where the original
guesses), as the gate does.
"""

from __future__ import annotations

import onnx

from prunec.eval import gate as gate_module
from prunec.eval.corruptions import image_layout, parse_corruptions
from prunec.eval.gate import Evaluator
from prunec.eval.slices import CLEAN
from prunec.runtime.inputs import graph_inputs

#: The gate's margin: corrupted slices where the original is closer to chance are not gated.
CHANCE_MARGIN = gate_module.CHANCE_MARGIN


def auto_corruptions(model: onnx.ModelProto, text: str = "auto") -> list[str]:
    """`auto`: every corruption for a model with a 4-D float image input, none otherwise."""
    if text.strip().lower() == "auto":
        images = any(s.dtype.kind == "f" and image_layout(s.dims) for s in graph_inputs(model))
        return parse_corruptions("all" if images else "none")
    return parse_corruptions(text)


def chance(evaluator: Evaluator) -> float | None:
    """The metric of a guessing model in percent (the gate's own notion; None: no such notion)."""
    return getattr(evaluator, "chance", None)


def gated_variants(evaluator: Evaluator, margin: float = CHANCE_MARGIN) -> list[str]:
    """Clean and every corrupted variant where the original is more than `margin` above chance."""
    c = chance(evaluator)
    return [v for v in evaluator.variants
            if v == CLEAN or c is None or evaluator.reference_value(v) >= c + margin]


def variant_drops(evaluator: Evaluator, candidate: onnx.ModelProto, variants: list[str],
                  baseline: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(metric per variant, drop per variant) of `candidate`, one run per variant."""
    outs = evaluator.outputs(candidate, variants)
    values = {v: float(evaluator.scores(v, outs[v])[1].mean() * 100) for v in variants}
    return values, {v: baseline[v] - values[v] for v in variants}
