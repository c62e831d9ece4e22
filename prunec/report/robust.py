"""The robustness lines of a run's summary: original -> pruned on clean and on every degraded slice.

A pruned model can keep its clean accuracy and lose it on degraded inputs, so a run that
gated a lossy result states both, whatever the verdict: one line per slice family (clean, each
corruption at the gated severity, user and length slices such as an OCR benchmark's degraded
renders), and a last line naming the worst of them (the largest drop among the gated ones).
"""

from __future__ import annotations

from prunec.eval.gate import GateReport, SliceResult

#: Slice kinds that are families of inputs (not subsets by class): what robustness is about.
FAMILIES = ("all", "corruption", "user", "length")
_UNIT = {"top1": "top-1 %", "agreement": "agreement %", "cosine": "cosine %"}


def family_slices(report: GateReport) -> list[SliceResult]:
    """The slices the robustness lines show, clean first."""
    return [s for s in report.slices if s.kind in FAMILIES]


def worst_slice(report: GateReport) -> SliceResult | None:
    """The gated family slice with the largest drop (near-chance slices are not gated)."""
    gated = [s for s in family_slices(report) if s.status != "near chance"]
    return max(gated, key=lambda s: s.drop.value) if gated else None


def _change(s: SliceResult) -> float:
    """pruned - original in points, without a '-0.0'."""
    v = -s.drop.value
    return 0.0 if abs(v) < 0.05 else v


def _line(s: SliceResult, width: int) -> str:
    name = "clean" if s.kind == "all" else s.name
    tail = {"fail": "  FAIL", "near chance": "  (original near chance: not gated)"}.get(s.status, "")
    return (f"  {name:<{width}} {s.original.value:6.1f} → {s.candidate.value:6.1f}  "
            f"({_change(s):+.1f}){tail}")


def robustness_lines(report: GateReport) -> list[str]:
    """The summary's robustness block (empty when the gate had no family slice)."""
    fam = family_slices(report)
    if not fam:
        return []
    width = max(len("clean" if s.kind == "all" else s.name) for s in fam)
    unit = _UNIT.get(report.metric, report.metric)
    lines = [f"robustness ({unit}, original → pruned):"] + [_line(s, width) for s in fam]
    w = worst_slice(report)
    if w is not None:
        name = "clean" if w.kind == "all" else w.name
        if not any(s.kind != "all" for s in fam):
            lines.append(f"worst slice: {name} (no degraded slice was evaluated: robustness unknown; "
                         "--corruptions or --slice adds them)")
        else:
            lines.append(f"worst slice: {name} {w.original.value:.1f} → {w.candidate.value:.1f} "
                         f"({_change(w):+.1f} points)")
    return lines
