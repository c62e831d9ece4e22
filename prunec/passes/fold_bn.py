"""`fold-bn`: fold inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm before it.

y = (x*W + b - mean) * s + beta with s = gamma / sqrt(var + eps) becomes x*(W*s) + (b - mean)*s + beta.
Legal only when the producer's output feeds the BN alone (otherwise other readers would see
scaled values), every parameter is constant, and the BN is not in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from prunec.graph.ir import NameGen, release_unused
from prunec.passes.base import Pass, PassContext, PassResult, Skip, register

_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def _const(t) -> np.ndarray | None:
    """The value of `t` if it is constant, looking through Identity nodes.

    Exporters write Identity nodes for deduplicated initializers (e.g. two BN biases that
    trained to the same values), so a parameter behind an Identity is still a constant.
    """
    while not isinstance(t, gs.Constant) and len(t.inputs) == 1 and t.inputs[0].op == "Identity" \
            and t.inputs[0].inputs:
        t = t.inputs[0].inputs[0]
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _fold_reason(bn: gs.Node, graph_outputs: set[int]) -> tuple[gs.Node | None, str | None]:
    """Return (producer, None) if `bn` can be folded, else (None, why not)."""
    if bn.attrs.get("training_mode", 0):
        return None, "training_mode=1"
    if len(bn.outputs) > 1:
        return None, "BatchNormalization in training form (running stats outputs)"
    x = bn.inputs[0]
    if not x.inputs:
        return None, "input is not produced by a node"
    prod = x.inputs[0]
    if prod.op not in _FOLDABLE:
        return None, f"preceded by {prod.op}, not Conv/ConvTranspose/Gemm"
    if len(x.outputs) != 1 or id(x) in graph_outputs:
        return None, f"output of {prod.name} has other readers"
    if any(_const(t) is None for t in bn.inputs[1:5]):
        return None, "BatchNormalization parameters are not constant"
    if _const(prod.inputs[1]) is None or (len(prod.inputs) > 2 and prod.inputs[2].name
                                          and _const(prod.inputs[2]) is None):
        return None, f"{prod.op} weight or bias is not constant"
    if prod.op == "Gemm":
        c = _const(prod.inputs[2]) if len(prod.inputs) > 2 and prod.inputs[2].name else None
        n = _const(prod.inputs[1]).shape[0 if prod.attrs.get("transB", 0) else 1]
        if c is not None and c.size not in (1, n) and c.shape[-1:] != (n,):
            return None, f"Gemm bias of shape {list(c.shape)} is not per output feature"
        if c is not None and c.ndim == 2 and c.shape[0] != 1:
            return None, f"Gemm bias of shape {list(c.shape)} is not per output feature"
    return prod, None


@register
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "Fold inference BatchNormalization into the preceding Conv, ConvTranspose or Gemm."
    exact = True
    preserves = frozenset({"folded"})

    @dataclass
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded, skipped = [], []
        outputs = set(id(t) for t in graph.outputs)
        names = NameGen(graph)
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            prod, why = _fold_reason(bn, outputs)
            if prod is None:
                skipped.append(Skip(bn.name, why))
                continue
            old = list(prod.inputs[1:3]) + list(bn.inputs[1:5])  # weights the fold replaces
            self._fold(names, prod, bn)
            for t in old:
                release_unused(t, graph)
            folded.append(bn.name)
        return PassResult(changed=bool(folded), details={"folded": len(folded), "folded_nodes": folded},
                          skipped=skipped)

    @staticmethod
    def _fold(names: NameGen, prod: gs.Node, bn: gs.Node) -> None:
        gamma, beta, mean, var = (_const(t).astype(np.float64) for t in bn.inputs[1:5])
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        w = _const(prod.inputs[1])
        dtype = w.dtype
        w = w.astype(np.float64)
        has_bias = len(prod.inputs) > 2 and prod.inputs[2].name != ""
        b = _const(prod.inputs[2]).astype(np.float64) if has_bias else None
        if prod.op == "Conv":
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            b = (b if b is not None else 0.0) * scale + shift
        elif prod.op == "ConvTranspose":
            group = int(prod.attrs.get("group", 1))
            cin, cout_g = w.shape[0], w.shape[1]
            s = scale.reshape(group, cout_g)  # output channel g*cout_g + j
            w = (w.reshape((group, cin // group, cout_g) + w.shape[2:])
                 * s.reshape((group, 1, cout_g) + (1,) * (w.ndim - 2))).reshape(w.shape)
            b = (b if b is not None else 0.0) * scale + shift
        else:  # Gemm: Y = alpha*A'B' + beta*C, output feature n is column n of B'
            gemm_beta = float(prod.attrs.get("beta", 1.0))
            w = w * (scale[:, None] if prod.attrs.get("transB", 0) else scale[None, :])
            c = b.reshape(-1) if b is not None else np.zeros(1)
            b = gemm_beta * c * scale + shift
            prod.attrs["beta"] = 1.0  # alpha multiplies A'B' only and stays as it is
        prod.inputs[1] = gs.Constant(names(prod.inputs[1].name + "_bnfold"),
                                     w.astype(dtype))
        bias = gs.Constant(names((prod.name or "node") + "_bias_bnfold"),
                           np.asarray(b, dtype=np.float64).reshape(-1).astype(dtype))
        if has_bias:
            prod.inputs[2] = bias
        else:
            prod.inputs.append(bias)
        # The producer now writes the BN's output tensor directly.
        y = bn.outputs[0]
        bn.outputs.clear()
        prod.outputs[0] = y
        bn.inputs.clear()
