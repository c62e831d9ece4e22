"""Channel rules for activations with a per-channel bias input (ONNX Runtime's fused MLP ops:
FastGelu, BiasGelu). Plain activations of one input (Gelu, Erf, Tanh, Sigmoid: every Gelu and
SiLU form exporters write) are unary rules in `pointwise`; gated forms (SwiGLU's
silu(gate) * up) are element-wise joins there, which couple the two up-projections."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from prunec.graph.channel_core import Walker, rule
from prunec.graph.rules.common import has_input


@rule("FastGelu", "BiasGelu", domain="com.microsoft")
def _bias_activation(w: Walker, node: gs.Node) -> None:
    """y = act(x + bias): channels pass, the bias (one constant per channel) is attached."""
    lab = w.label(node.inputs[0])
    bias = node.inputs[1] if has_input(node, 1) else None
    if bias is not None and w.label(bias) is not None:
        w.freeze_node(node, f"{node.op} {node.name!r}: channels in its bias input")
        return
    if lab is None:
        return
    r = w.rank(node.inputs[0])
    if bias is not None:
        n = lab.atoms.shape[0]
        if not (isinstance(bias, gs.Constant) and bias.values.ndim == 1 and bias.values.shape[0] == n
                and lab.single and r is not None and lab.axes[0] == r - 1):
            w.freeze(lab, f"{node.op} {node.name!r}: bias is not one constant per channel")
            return
        w.site(node, bias, 0, lab.atoms, "attached")
    w.set(node.outputs[0], lab)
