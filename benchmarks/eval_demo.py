"""Benchmark for BENCHMARKS.md: sensitivity-planned vs uniform channel pruning at equal MAC
budgets, and the demo's prune potential on clean data vs each corruption.

    PYTHONPATH=. python benchmarks/eval_demo.py [models/demo_cnn.onnx models/demo_digits_test.npz]

Prints markdown. No fine-tuning after pruning (prunec rewrites exported models).
"""

from __future__ import annotations

import datetime
import platform
import sys
import tempfile
from pathlib import Path

import onnx

from prunec.eval.budget import Budget, allocate, uniform_for_budget
from prunec.eval.corruptions import CORRUPTIONS
from prunec.eval.data import load_npz
from prunec.eval.gate import Evaluator, GateThresholds
from prunec.eval.metrics import estimate
from prunec.eval.potential import prune_potential
from prunec.eval.sensitivity import prune, sensitivity


def main(model_path: str = "models/demo_cnn.onnx", data_path: str = "models/demo_digits_test.npz") -> None:
    model = onnx.load(model_path)
    data = load_npz(data_path, model)
    print(f"_{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{data.n} held-out samples, `{model_path}`_\n")
    clean = Evaluator(model, data)
    with tempfile.TemporaryDirectory() as cache:
        sens = sensitivity(model, clean, [0.2, 0.4, 0.6], cache=Path(cache))
    print(f"Sensitivity: {sum(not g.group.frozen for g in sens.groups)} prunable groups x 3 ratios; "
          f"original top-1 {sens.baseline:.2f}%.\n")
    print("| MAC budget | plan: MACs kept | plan: top-1 % (95% CI) | uniform ratio | uniform: MACs kept "
          "| uniform: top-1 % (95% CI) |")
    print("|---|---|---|---|---|---|")
    for f in (0.8, 0.7, 0.6, 0.5):
        b = Budget("macs", f)
        plan = allocate(model, sens, b)
        planned, _ = prune(model, plan.to_dict())
        r, uniform, achieved = uniform_for_budget(model, b)
        cells = []
        for m in (planned, uniform):
            outs = clean.outputs(m)["clean"]
            e = estimate(clean.scores("clean", outs)[1] * 100)
            cells.append(f"{e.value:.2f} ({e.lo:.1f}-{e.hi:.1f})")
        print(f"| {f:.0%} | {plan.achieved / sens.macs:.1%} | {cells[0]} | {r:.3f} | "
              f"{achieved / sens.macs:.1%} | {cells[1]} |")
    # The gate on the 80% plan: clean accuracy is kept, degraded inputs are not.
    plan80, _ = prune(model, allocate(model, sens, Budget("macs", 0.8)).to_dict())
    ev1 = Evaluator(model, data, corruptions=list(CORRUPTIONS), severities=[1])
    gate = ev1.compare(plan80, GateThresholds(max_drop=1.0))
    print("\n`prunec check` on the 80%-MAC plan (--max-drop 1.0, corruptions at severity 1):\n")
    print("| slice | n | original | pruned | drop | 95% CI of drop | verdict |")
    print("|---|---|---|---|---|---|---|")
    for sl in gate.slices:
        if sl.kind in ("all", "rare", "corruption"):
            print(f"| {sl.name} | {sl.n} | {sl.original.value:.2f} | {sl.candidate.value:.2f} | "
                  f"{sl.drop.value:+.2f} | {sl.drop.lo:.1f}..{sl.drop.hi:.1f} | {sl.status} |")
    worst = max((sl for sl in gate.slices if sl.kind == "class"), key=lambda sl: sl.drop.value)
    print(f"\nWorst class slice: {worst.name} (n={worst.n}) drop {worst.drop.value:+.2f} ({worst.status}); "
          f"gate {'PASSED' if gate.passed else 'FAILED'} ({len(gate.failed)} failing slices).")
    for sev in (1, 3):
        ev = Evaluator(model, data, corruptions=list(CORRUPTIONS), severities=[sev])
        uni = prune_potential(model, ev, [0.03, 0.07, 0.1, 0.13, 0.2, 0.3], delta=0.5)
        pl = prune_potential(model, ev, [0.1, 0.2, 0.3, 0.4, 0.5], delta=0.5, sensitivity=sens)
        print(f"\nPrune potential (δ = 0.5 points), corruption severity {sev}:\n")
        print("| input | original top-1 % | uniform: largest channel ratio | planned: largest MAC fraction removed "
              "| planned: top-1 % at 30% MACs removed |")
        print("|---|---|---|---|---|")
        at = pl.ratios.index(0.3) if 0.3 in pl.ratios else None
        for v in ev.variants:
            at_30 = f"{pl.values[v][at]:.2f}" if at is not None else "-"
            print(f"| {v} | {uni.baseline[v]:.2f} | {uni.potential[v]:g} | {pl.potential[v]:g} | {at_30} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
