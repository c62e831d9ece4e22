"""`sparsity`: unstructured magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights.

Per layer (default), each selected weight loses its `ratio` smallest-magnitude entries. With
`global=true` one magnitude threshold is shared by all selected layers, so the *total* fraction
of zeros is `ratio` and sensitive layers can keep more. A plan file (JSON object mapping node
or weight names to ratios) sets ratios per layer; listed layers are pruned to their own ratio
and the rest follow `ratio` (or the global threshold over the unlisted ones). Zeros that are
already there count towards the ratio. Ties at the threshold are broken by position so the
achieved ratio is exact to one element. Lossy: the manager measures the output error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from prunec.errors import OptionError
from prunec.passes.base import Pass, PassContext, PassResult, option, read_json_file, register
from prunec.passes.weights import SelectionOptions, WeightLayer, read_elsewhere, select_layers


def prune_smallest(w: np.ndarray, ratio: float) -> np.ndarray:
    """Zero the round(ratio * size) smallest-magnitude entries of `w`."""
    k = int(round(ratio * w.size))
    if k <= 0:
        return w
    flat = w.reshape(-1).copy()
    idx = np.argsort(np.abs(flat), kind="stable")[:k]
    flat[idx] = 0
    return flat.reshape(w.shape)


def _read_plan(path: Path) -> dict[str, float]:
    plan = read_json_file(path, "sparsity.plan:")
    if not isinstance(plan, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in plan.values()):
        raise OptionError(f"sparsity.plan: {path}: expected a JSON object of layer name -> ratio in [0, 1)")
    return {str(k): float(v) for k, v in plan.items()}


@register
class Sparsity(Pass):
    name = "sparsity"
    summary = "Unstructured magnitude pruning to a target ratio, per layer or global; lossy."
    exact = False

    @dataclass
    class Options(SelectionOptions):
        ratio: float = option(0.5, "Fraction of weights set to zero, in [0, 1).")
        global_: bool = option(False, "One magnitude threshold over all selected layers "
                                      "(total sparsity = ratio) instead of ratio per layer.")
        plan: Path | None = option(None, "JSON file {layer or weight name: ratio} overriding "
                                         "the ratio for the listed layers.")

        def validate(self) -> None:
            if not 0 <= self.ratio < 1:
                raise OptionError(f"sparsity.ratio must be in [0, 1), got {self.ratio}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        layers, skipped = select_layers(graph, o, self.name)
        layers, shared = read_elsewhere(layers)
        skipped += shared
        plan = _read_plan(o.plan) if o.plan else {}
        by_weight: dict[str, list[WeightLayer]] = {}
        for layer in layers:
            by_weight.setdefault(layer.weight.name, []).append(layer)
        known = {layer.name for layer in layers} | set(by_weight)
        unknown = sorted(set(plan) - known)
        if unknown:
            raise OptionError(f"sparsity.plan names layer(s) that are not selected weight layers: "
                              f"{', '.join(unknown[:5])}")

        def planned(group: list[WeightLayer]) -> float | None:
            hits = {plan[n] for n in [group[0].weight.name] + [layer.name for layer in group] if n in plan}
            if len(hits) > 1:
                raise OptionError(f"sparsity.plan gives weight {group[0].weight.name} "
                                  f"(shared by several layers) different ratios")
            return hits.pop() if hits else None

        weights = {name: np.asarray(group[0].weight.values) for name, group in by_weight.items()}
        ratios = {name: planned(group) for name, group in by_weight.items()}
        free = [n for n, r in ratios.items() if r is None]
        if o.global_ and free:
            # One threshold: rank all free weights together and zero the smallest ratio * total.
            mags = np.concatenate([np.abs(weights[n]).reshape(-1) for n in free])
            k = int(round(o.ratio * mags.size))
            keep = np.ones(mags.size, dtype=bool)
            keep[np.argsort(mags, kind="stable")[:k]] = False
            start = 0
            for n in free:
                size = weights[n].size
                m = keep[start:start + size].reshape(weights[n].shape)
                weights[n] = np.where(m, weights[n], np.zeros((), weights[n].dtype))
                start += size
        else:
            for n in free:
                weights[n] = prune_smallest(weights[n], o.ratio)
        for n, r in ratios.items():
            if r is not None:
                weights[n] = prune_smallest(weights[n], r)

        per_layer: dict[str, dict] = {}
        for name, group in by_weight.items():
            group[0].weight.values = np.ascontiguousarray(weights[name])
            s = float(np.mean(weights[name] == 0))
            for layer in group:
                per_layer[layer.name] = {"op": layer.node.op, "weight": name,
                                         "shape": list(weights[name].shape), "sparsity": s}
        total = sum(w.size for w in weights.values())
        zeros = sum(int(np.count_nonzero(w == 0)) for w in weights.values())
        written = set(by_weight)
        return PassResult(changed=bool(per_layer),
                          details={"layers": len(per_layer), "per_layer": per_layer,
                                   "sparsity": zeros / total if total else 0.0,
                                   "mode": "global" if o.global_ else "per-layer"},
                          skipped=skipped, masked_weights=written)
