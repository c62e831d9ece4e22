"""Which layers the sparsity passes (`2to4`, `sparsity`, `csr`) touch, chosen one way for all three.

A layer is a Conv, ConvTranspose, Gemm or MatMul node whose weight (input 1) is a float
constant. Users narrow the set with include/exclude regexes over node names, a minimum weight
size, and by leaving the first and last layers dense (they are usually the most sensitive).
Everything left out for a reason other than the user's own filters is reported as a Skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from prunec.errors import OptionError
from prunec.passes.base import Skip, option

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class WeightLayer:
    """One prunable layer: the node and its constant weight tensor."""

    node: gs.Node
    weight: gs.Constant

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name


@dataclass
class SelectionOptions:
    """Layer filters shared by the sparsity passes (mixed into each pass's Options)."""

    include: str | None = option(None, "Regex over node names; only matching layers are changed.")
    exclude: str | None = option(None, "Regex over node names; matching layers are left dense.")
    min_size: int = option(0, "Leave layers whose weight has fewer elements than this dense.")
    skip_first_last: bool = option(False, "Leave the first and the last weight layer dense.")


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise OptionError(f"{what}: invalid regex {pattern!r}: {exc}") from None


def select_layers(graph: gs.Graph, opts, pass_name: str) -> tuple[list[WeightLayer], list[Skip]]:
    """Weight layers in graph order that pass the user's filters, and the ones skipped for cause."""
    inc = _compile(opts.include, f"{pass_name}.include")
    exc = _compile(opts.exclude, f"{pass_name}.exclude")
    layers: list[WeightLayer] = []
    skipped: list[Skip] = []
    for node in graph.nodes:
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            if node.op != "MatMul":  # activation x activation MatMuls are not weight layers
                skipped.append(Skip(node.name, "weight is not a constant"))
            continue
        if np.dtype(w.dtype).kind != "f":
            skipped.append(Skip(node.name, f"weight dtype {np.dtype(w.dtype).name} is not floating point"))
            continue
        layers.append(WeightLayer(node, w))
    if opts.skip_first_last and layers:
        ends = [layers[0]] + ([layers[-1]] if len(layers) > 1 else [])
        skipped.extend(Skip(layer.name, "first/last layer left dense (skip-first-last)") for layer in ends)
        layers = layers[1:-1]
    kept = []
    for layer in layers:
        if inc and not inc.search(layer.name):
            continue
        if exc and exc.search(layer.name):
            continue
        size = int(np.prod(layer.weight.shape))
        if size < opts.min_size:
            skipped.append(Skip(layer.name, f"weight has {size} elements < min-size {opts.min_size}"))
            continue
        kept.append(layer)
    return kept, skipped


def shared_weights(layers: list[WeightLayer]) -> set[str]:
    """Names of weight tensors read by more than one selected layer."""
    seen: dict[str, int] = {}
    for layer in layers:
        seen[layer.weight.name] = seen.get(layer.weight.name, 0) + 1
    return {k for k, v in seen.items() if v > 1}


def read_elsewhere(layers: list[WeightLayer]) -> tuple[list[WeightLayer], list[Skip]]:
    """Leave out layers whose weight is also read by a node that is not a selected layer (an
    excluded or ineligible layer, a Gather of tied embeddings, any other op): changing it would
    change that reader too. Returns the layers that remain and a Skip for each one left out."""
    selected = {id(layer.node) for layer in layers}
    kept, skipped = [], []
    for layer in layers:
        others = [n for n in layer.weight.outputs if id(n) not in selected]
        if others:
            names = ", ".join(f"{n.op} {n.name!r}" for n in others[:3])
            skipped.append(Skip(layer.name, f"weight {layer.weight.name} is also read by {names}, "
                                            "which is not being changed; left as it is"))
        else:
            kept.append(layer)
    return kept, skipped
