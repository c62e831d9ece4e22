"""`2to4`: 2:4 structured sparsity, in the layout sparse tensor cores (TensorRT) can use.

In every group of 4 consecutive weights along the **reduction axis** (the axis summed over in
the layer's dot products), the 2 of largest magnitude are kept and the other 2 set to zero
(ties keep the earlier position). The groups, per op:

- Conv, weight [O, I/g, kh, kw]: groups of 4 consecutive input channels (axis 1) for each output
  channel o and each kernel position (kh, kw), i.e. along I/g in the [O, kh, kw, I/g] view.
  This is what TensorRT's sparse convolution kernels require. (Grouping along the flattened
  [I/g*kh*kw] kernel, as onnxsim's N:M pass does, mixes kernel positions and is not eligible
  for 3x3 convs.) Needs (I/g) % 4 == 0; each group's channels lie inside one conv group.
- ConvTranspose, weight [I, O/g, kh, kw]: the reduction runs over input channels (axis 0), so
  groups are 4 consecutive input channels for each output channel and kernel position, within
  one conv group: needs (I/g) % 4 == 0. TensorRT support for sparse deconvolution varies.
- Gemm, Y = A' * B' with B' of shape [K, N]: groups along K for each output column n, i.e.
  along axis 0 of B when transB=0, along axis 1 (contiguous rows) of B [N, K] when transB=1.
- MatMul with constant B [..., K, N]: groups along K (axis -2) for each column n.

Layers whose reduction size is not a multiple of 4, or whose weight is shared by layers that
disagree on the axis, are left dense and reported. Lossy: the manager measures the output error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from prunec.passes.base import Pass, PassContext, PassResult, Skip, register
from prunec.passes.weights import SelectionOptions, WeightLayer, read_elsewhere, select_layers

#: Group size M and kept count N of the N:M pattern.
GROUP, KEEP = 4, 2


def reduction_axis(layer: WeightLayer) -> tuple[int | None, str | None]:
    """The weight axis that 2:4 groups run along for this layer, or (None, why it has none)."""
    node, w = layer.node, layer.weight
    rank = len(w.shape)
    if node.op == "Conv":
        return (1, None) if rank >= 3 else (None, f"Conv weight of rank {rank}")
    if node.op == "ConvTranspose":
        return (0, None) if rank >= 3 else (None, f"ConvTranspose weight of rank {rank}")
    if node.op == "Gemm":
        if rank != 2:
            return None, f"Gemm weight of rank {rank}"
        return (1 if node.attrs.get("transB", 0) else 0), None
    if rank < 2:
        return None, "MatMul weight is a vector (no reduction axis to group)"
    return rank - 2, None


def group_size_along(layer: WeightLayer, axis: int) -> int:
    """How many weights are summed along `axis` inside one group of the conv (or all of them)."""
    n = int(layer.weight.shape[axis])
    if layer.node.op == "ConvTranspose":
        return n // int(layer.node.attrs.get("group", 1))
    return n


def prune_2to4(w: np.ndarray, axis: int) -> np.ndarray:
    """Zero the 2 smallest-magnitude weights in every 4 consecutive along `axis`."""
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(-1, GROUP)
    # Stable sort on -|w| keeps the earlier of equal weights, so the result is deterministic.
    order = np.argsort(-np.abs(groups), axis=1, kind="stable")
    mask = np.ones_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, KEEP:], False, axis=1)
    pruned = np.where(mask, groups, np.zeros((), dtype=w.dtype)).reshape(moved.shape)
    return np.ascontiguousarray(np.moveaxis(pruned, -1, axis))


def _satisfies(w: np.ndarray, axis: int) -> bool:
    groups = np.moveaxis(w, axis, -1).reshape(-1, GROUP)
    return bool(np.all(np.count_nonzero(groups, axis=1) <= KEEP))


@register
class TwoFour(Pass):
    name = "2to4"
    summary = ("2:4 structured sparsity on Conv/ConvTranspose/Gemm/MatMul weights along the "
               "reduction axis (TensorRT sparse-kernel layout); lossy.")
    exact = False

    @dataclass
    class Options(SelectionOptions):
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        layers, skipped = select_layers(graph, self.options, self.name)
        layers, shared = read_elsewhere(layers)
        skipped += shared
        users: dict[str, list[WeightLayer]] = {}
        for layer in layers:
            users.setdefault(layer.weight.name, []).append(layer)
        per_layer: dict[str, dict] = {}
        for wname, group in users.items():
            found = {reduction_axis(layer) for layer in group}
            if len(found) != 1:
                skipped.extend(Skip(layer.name, f"weight {wname} is shared by layers that reduce "
                                                "along different axes") for layer in group)
                continue
            axis, why = found.pop()
            if axis is None:
                skipped.extend(Skip(layer.name, why) for layer in group)
                continue
            sizes = {group_size_along(layer, axis) for layer in group}
            if any(s % GROUP for s in sizes) or int(group[0].weight.shape[axis]) % GROUP:
                skipped.extend(Skip(layer.name, f"reduction size {min(sizes)} is not a multiple "
                                                f"of {GROUP}") for layer in group)
                continue
            w = np.asarray(group[0].weight.values)
            pruned = prune_2to4(w, axis)
            if not _satisfies(pruned, axis):  # a bug, never a user error
                raise AssertionError(f"2to4 produced a weight for {wname} that is not 2:4")
            group[0].weight.values = pruned  # in place: every reader sees the same weight
            for layer in group:
                per_layer[layer.name] = {"op": layer.node.op, "weight": wname, "axis": axis,
                                         "shape": list(w.shape),
                                         "sparsity": float(np.mean(pruned == 0))}
        total = sum(int(np.prod(v["shape"])) for v in per_layer.values())
        zeros = sum(v["sparsity"] * int(np.prod(v["shape"])) for v in per_layer.values())
        return PassResult(changed=bool(per_layer),
                          details={"layers": len(per_layer), "per_layer": per_layer,
                                   "sparsity": zeros / total if total else 0.0},
                          skipped=skipped, masked_weights={v["weight"] for v in per_layer.values()})
