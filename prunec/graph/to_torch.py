"""An ONNX graph as a trainable torch module: each node runs as the matching torch op, in graph order.

Why not onnx2torch (checked, version 1.5.15 with torch 2.13.0 and onnx 1.23): it imports
torchvision at import time, and PyPI's torchvision does not import beside the CPU build of torch
2.13.0 ("operator torchvision::nms does not exist"); it fails on the PP-OCRv4 recognizer (weights
held in Constant nodes: KeyError) and on an exported MiniLM (no converter for GreaterOrEqual-16);
and it keeps most initializers as untrainable buffers, one copy per use, behind converted modules
whose weights are transformed (Gemm alpha and transB folded into nn.Linear), so trained values do
not map back to initializers by name. Here every float constant of the graph with more than one
element is one `nn.Parameter` keyed by its ONNX name, shared by all its readers, so training
writes straight back into the same initializers and the graph structure stays what was verified.

Ops without a rule are refused up front, all of them named in one `UnsupportedOpError`. torch is
imported lazily by the caller (`require_torch`), so prunec works without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from prunec.errors import UnsupportedOpError

TORCH_HINT = "pip install 'prunec[distill]' (torch==2.13.0)"


def require_torch(what: str):
    """Import torch, or a one-line UnsupportedOpError telling what to install."""
    try:
        import torch
    except ImportError:
        raise UnsupportedOpError(f"{what} needs PyTorch: {TORCH_HINT}") from None
    return torch


@dataclass
class OnnxNode:
    """One node as the interpreter needs it: op, input/output names ('' = absent), attributes."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        out[a.name] = v
    return out


def _constant_value(attrs: dict[str, Any]) -> np.ndarray:
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise UnsupportedOpError(f"Constant node with attributes {sorted(attrs)} is not supported")


# Inputs that hold statistics, not weights: BatchNormalization's running mean and variance stay
# frozen (training them by gradient would only mimic what a bias already does).
_FROZEN_INPUTS = {"BatchNormalization": (3, 4)}


def _default_trainable(name: str, value: np.ndarray, readers: list[tuple[str, int]]) -> bool:
    """Float constants with more than one element, read as data (weights, biases, scales,
    embeddings); scalars (epsilons, exponents, mask fills) and integers stay fixed."""
    if value.dtype.kind != "f" or value.size <= 1:
        return False
    return not any(i in _FROZEN_INPUTS.get(op, ()) for op, i in readers)


def convert(model: onnx.ModelProto, *, trainable: Callable[[str, np.ndarray, list], bool] | None = None):
    """Build a `TorchGraph` (an nn.Module) that runs `model`; raises UnsupportedOpError naming
    every op it has no rule for (and custom domains)."""
    torch = require_torch("converting ONNX to torch")
    if any(n.op_type in ("If", "Loop", "Scan") for n in model.graph.node):
        raise UnsupportedOpError("control flow (If/Loop/Scan) cannot be converted to torch for training")
    missing = sorted({(n.domain or "ai.onnx", n.op_type) for n in model.graph.node
                      if n.domain not in ("", "ai.onnx") or (n.op_type not in OPS and n.op_type != "Constant")})
    if missing:
        names = ", ".join(op if dom == "ai.onnx" else f"{dom}.{op}" for dom, op in missing)
        raise UnsupportedOpError(f"no torch conversion for op(s) {names}; distill cannot train this graph")
    return TorchGraph(model, trainable or _default_trainable, torch)


def _make_class(torch):
    nn = torch.nn

    class _TorchGraph(nn.Module):
        """The ONNX graph as a torch module. `forward(feeds)` takes {input name: tensor} and returns
        {output name: tensor} (plus any `extra` tensor names asked for). Float constants with more
        than one element are parameters named by `param_names` (ONNX name -> parameter key)."""

        def __init__(self, model: onnx.ModelProto, trainable, _torch):
            super().__init__()
            g = model.graph
            self.opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
            inits = {t.name for t in g.initializer}
            self.input_names = [i.name for i in g.input if i.name not in inits]
            self.output_names = [o.name for o in g.output]
            consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
            self.nodes: list[OnnxNode] = []
            for n in g.node:
                attrs = _attrs(n)
                if n.op_type == "Constant":
                    consts[n.output[0]] = _constant_value(attrs)
                    continue
                self.nodes.append(OnnxNode(n.op_type, n.name, list(n.input), list(n.output), attrs))
            readers: dict[str, list[tuple[str, int]]] = {}
            for n in self.nodes:
                for i, name in enumerate(n.inputs):
                    readers.setdefault(name, []).append((n.op, i))
            self.param_names: dict[str, str] = {}
            self._buffer_names: dict[str, str] = {}
            self.params = nn.ParameterDict()
            for k, (name, value) in enumerate(consts.items()):
                if name not in readers and name not in self.output_names:
                    continue
                tensor = _torch.from_numpy(np.array(value, copy=True))
                key = f"c{k}"
                if trainable(name, value, readers.get(name, [])):
                    self.params[key] = nn.Parameter(tensor)
                    self.param_names[name] = key
                else:
                    self.register_buffer(key, tensor, persistent=False)
                    self._buffer_names[name] = key

        def constant(self, name: str):
            """The current value of a graph constant (parameter or buffer) by ONNX name."""
            if name in self.param_names:
                return self.params[self.param_names[name]]
            return getattr(self, self._buffer_names[name])

        def forward(self, feeds: dict, extra: tuple[str, ...] = ()) -> dict:
            env: dict[str, Any] = {"": None}
            for name, key in self.param_names.items():
                env[name] = self.params[key]
            for name, key in self._buffer_names.items():
                env[name] = getattr(self, key)
            env.update(feeds)
            for node in self.nodes:
                ins = [env[i] if i else None for i in node.inputs]
                try:
                    outs = OPS[node.op](node, ins, self.opset)
                except UnsupportedOpError:
                    raise
                except Exception as exc:  # name the node: the converter, not the caller, is at fault
                    raise RuntimeError(f"torch conversion of node {node.name!r} ({node.op}) failed: {exc}") from exc
                for name, value in zip(node.outputs, outs):
                    if name:
                        env[name] = value
            wanted = list(self.output_names) + [e for e in extra if e not in self.output_names]
            return {name: env[name] for name in wanted}

        def trained_values(self) -> dict[str, np.ndarray]:
            """Every parameter's current value as a numpy array, by ONNX name."""
            return {name: self.params[key].detach().cpu().numpy()
                    for name, key in self.param_names.items()}

    return _TorchGraph


_CLASS = None


def TorchGraph(model, trainable, torch):
    """Instantiate the torch module class (made once, after torch is imported)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class(torch)
    return _CLASS(model, trainable, torch)


# ----------------------------------------------------------------------------- op rules
# Each rule: (node, inputs as tensors or None, default-domain opset) -> list of outputs.

OPS: dict[str, Callable] = {}


def op(*names: str):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return deco


def _t():
    import torch
    return torch


def _F():
    import torch.nn.functional as F
    return F


def _ints(x) -> list[int]:
    """A shape/axes input (tensor or list) as Python ints."""
    if x is None:
        return []
    if hasattr(x, "tolist"):
        v = x.tolist()
        return [int(v)] if not isinstance(v, list) else [int(i) for i in v]
    return [int(i) for i in x]


def _torch_dtype(onnx_type: int):
    torch = _t()
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


_BINARY = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Equal": lambda a, b: a == b, "Less": lambda a, b: a < b, "Greater": lambda a, b: a > b,
    "LessOrEqual": lambda a, b: a <= b, "GreaterOrEqual": lambda a, b: a >= b,
    "And": lambda a, b: a & b, "Or": lambda a, b: a | b, "Xor": lambda a, b: a ^ b,
}


@op(*_BINARY)
def _binary(node, ins, opset):
    return [_BINARY[node.op](ins[0], ins[1])]


@op("Div")
def _div(node, ins, opset):
    a, b = ins
    if a.is_floating_point():
        return [a / b]
    return [_t().div(a, b, rounding_mode="trunc")]


@op("Mod")
def _mod(node, ins, opset):
    torch = _t()
    return [torch.fmod(*ins) if node.attrs.get("fmod", 0) else torch.remainder(*ins)]


@op("Pow")
def _pow(node, ins, opset):
    base, exp = ins
    return [_t().pow(base, exp).to(base.dtype)]


_UNARY = {
    "Relu": lambda x: _t().relu(x), "Sigmoid": lambda x: _t().sigmoid(x), "Tanh": lambda x: _t().tanh(x),
    "Exp": lambda x: _t().exp(x), "Log": lambda x: _t().log(x), "Sqrt": lambda x: _t().sqrt(x),
    "Neg": lambda x: -x, "Abs": lambda x: _t().abs(x), "Reciprocal": lambda x: 1.0 / x,
    "Erf": lambda x: _t().erf(x), "Floor": lambda x: _t().floor(x), "Ceil": lambda x: _t().ceil(x),
    "Round": lambda x: _t().round(x), "Sign": lambda x: _t().sign(x), "Sin": lambda x: _t().sin(x),
    "Cos": lambda x: _t().cos(x), "Not": lambda x: _t().logical_not(x), "Identity": lambda x: x,
    "Softplus": lambda x: _F().softplus(x), "Softsign": lambda x: x / (1 + _t().abs(x)),
    "HardSwish": lambda x: _F().hardswish(x), "Mish": lambda x: _F().mish(x),
    "IsNaN": lambda x: _t().isnan(x),
}


@op(*_UNARY)
def _unary(node, ins, opset):
    return [_UNARY[node.op](ins[0])]


@op("Dropout")
def _dropout(node, ins, opset):  # inference: identity (and an all-true mask)
    return [ins[0], _t().ones_like(ins[0], dtype=_t().bool)]


@op("LeakyRelu")
def _leaky(node, ins, opset):
    return [_F().leaky_relu(ins[0], node.attrs.get("alpha", 0.01))]


@op("Elu")
def _elu(node, ins, opset):
    return [_F().elu(ins[0], node.attrs.get("alpha", 1.0))]


@op("Selu")
def _selu(node, ins, opset):
    a, g = node.attrs.get("alpha", 1.67326319217681884765625), node.attrs.get("gamma", 1.05070102214813232421875)
    x = ins[0]
    return [g * _t().where(x > 0, x, a * (_t().exp(x) - 1))]


@op("HardSigmoid")
def _hard_sigmoid(node, ins, opset):
    a, b = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    return [_t().clamp(a * ins[0] + b, 0.0, 1.0)]


@op("Gelu")
def _gelu(node, ins, opset):
    return [_F().gelu(ins[0], approximate=node.attrs.get("approximate", "none"))]


@op("PRelu")
def _prelu(node, ins, opset):
    x, slope = ins
    return [_t().where(x >= 0, x, x * slope)]


@op("Clip")
def _clip(node, ins, opset):
    x = ins[0]
    if opset < 11:
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
    else:
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else None
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else None
    if lo is not None:
        x = _t().maximum(x, lo if hasattr(lo, "dim") else _t().tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = _t().minimum(x, hi if hasattr(hi, "dim") else _t().tensor(hi, dtype=x.dtype))
    return [x]


@op("Cast")
def _cast(node, ins, opset):
    return [ins[0].to(_torch_dtype(node.attrs["to"]))]


@op("CastLike")
def _cast_like(node, ins, opset):
    return [ins[0].to(ins[1].dtype)]


@op("Where")
def _where(node, ins, opset):
    return [_t().where(ins[0].bool(), ins[1], ins[2])]


@op("Max", "Min", "Sum", "Mean")
def _variadic(node, ins, opset):
    torch = _t()
    out = ins[0]
    for x in ins[1:]:
        out = {"Max": torch.maximum, "Min": torch.minimum}.get(node.op, torch.add)(out, x)
    return [out / len(ins) if node.op == "Mean" else out]


def _softmax_like(node, ins, opset, fn):
    x = ins[0]
    if opset < 13:  # coerced to 2-D at `axis` (default 1)
        axis = node.attrs.get("axis", 1) % x.dim()
        shape = x.shape
        flat = x.reshape(int(np.prod(shape[:axis])) if axis else 1, -1)
        return [fn(flat, -1).reshape(shape)]
    return [fn(x, node.attrs.get("axis", -1))]


@op("Softmax")
def _softmax(node, ins, opset):
    return _softmax_like(node, ins, opset, lambda x, d: _t().softmax(x, d))


@op("LogSoftmax")
def _log_softmax(node, ins, opset):
    return _softmax_like(node, ins, opset, lambda x, d: _t().log_softmax(x, d))


def _conv_padding(node, x, w_spatial: list[int]) -> tuple[list[int], list[int]]:
    """(begin pads, end pads) per spatial axis, resolving auto_pad against the input size."""
    k = len(w_spatial)
    strides = node.attrs.get("strides", [1] * k)
    dil = node.attrs.get("dilations", [1] * k)
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(k):
            size = x.shape[2 + i]
            out = math.ceil(size / strides[i])
            total = max(0, (out - 1) * strides[i] + (w_spatial[i] - 1) * dil[i] + 1 - size)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * k, [0] * k
    pads = node.attrs.get("pads", [0] * 2 * k)
    return list(pads[:k]), list(pads[k:])


def _pad_input(x, begin, end, value=0.0):
    """Pad spatial axes asymmetrically (torch's F.pad lists the last axis first)."""
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return _F().pad(x, flat, value=value)


@op("Conv")
def _conv(node, ins, opset):
    F = _F()
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    k = w.dim() - 2
    begin, end = _conv_padding(node, x, list(w.shape[2:]))
    if begin != end:
        x, pad = _pad_input(x, begin, end), 0
    else:
        pad = begin
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(k)
    if fn is None:
        raise UnsupportedOpError(f"Conv with {k} spatial dims")
    return [fn(x, w, b, stride=node.attrs.get("strides", [1] * k), padding=pad,
               dilation=node.attrs.get("dilations", [1] * k), groups=node.attrs.get("group", 1))]


@op("ConvTranspose")
def _conv_transpose(node, ins, opset):
    F = _F()
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    k = w.dim() - 2
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in node.attrs:
        raise UnsupportedOpError("ConvTranspose with auto_pad SAME or output_shape")
    pads = node.attrs.get("pads", [0] * 2 * k)
    if list(pads[:k]) != list(pads[k:]):
        raise UnsupportedOpError("ConvTranspose with asymmetric pads")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[k]
    return [fn(x, w, b, stride=node.attrs.get("strides", [1] * k), padding=list(pads[:k]),
               output_padding=node.attrs.get("output_padding", [0] * k), groups=node.attrs.get("group", 1),
               dilation=node.attrs.get("dilations", [1] * k))]


@op("Gemm")
def _gemm(node, ins, opset):
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    if node.attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if node.attrs.get("transB", 0):
        b = b.transpose(0, 1)
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return [y]


@op("MatMul")
def _matmul(node, ins, opset):
    return [_t().matmul(ins[0], ins[1])]


@op("Einsum")
def _einsum(node, ins, opset):
    return [_t().einsum(node.attrs["equation"], *ins)]


@op("BatchNormalization")
def _batch_norm(node, ins, opset):
    x, scale, bias, mean, var = ins[:5]
    if node.attrs.get("training_mode", 0):
        raise UnsupportedOpError("BatchNormalization in training mode")
    return [_F().batch_norm(x, mean, var, scale, bias, training=False, eps=node.attrs.get("epsilon", 1e-5))]


@op("InstanceNormalization")
def _instance_norm(node, ins, opset):
    x, scale, bias = ins
    return [_F().instance_norm(x, weight=scale, bias=bias, eps=node.attrs.get("epsilon", 1e-5))]


@op("LayerNormalization")
def _layer_norm(node, ins, opset):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = node.attrs.get("axis", -1) % x.dim()
    shape = tuple(x.shape[axis:])
    eps = node.attrs.get("epsilon", 1e-5)
    if scale.shape != shape or (bias is not None and bias.shape != shape):  # broadcast scale/bias
        y = _F().layer_norm(x, shape, eps=eps) * scale
        return [y + bias if bias is not None else y]
    return [_F().layer_norm(x, shape, scale, bias, eps)]


@op("GlobalAveragePool")
def _gap(node, ins, opset):
    x = ins[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@op("GlobalMaxPool")
def _gmp(node, ins, opset):
    x = ins[0]
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


@op("AveragePool", "MaxPool")
def _pool(node, ins, opset):
    F = _F()
    x = ins[0]
    kernel = list(node.attrs["kernel_shape"])
    k = len(kernel)
    strides = node.attrs.get("strides", [1] * k)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    begin, end = _conv_padding(node, x, kernel) if node.attrs.get("auto_pad", "NOTSET") != "NOTSET" or \
        "pads" in node.attrs else ([0] * k, [0] * k)
    if node.op == "MaxPool":
        if len(node.outputs) > 1 and node.outputs[1]:
            raise UnsupportedOpError("MaxPool with an Indices output")
        dil = node.attrs.get("dilations", [1] * k)
        pad = begin
        if begin != end:
            x, pad = _pad_input(x, begin, end, value=float("-inf")), [0] * k
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
        return [fn(x, kernel, strides, pad, dil, ceil_mode=ceil)]
    include = bool(node.attrs.get("count_include_pad", 0))
    if begin != end:
        if not include:
            raise UnsupportedOpError("AveragePool with asymmetric pads and count_include_pad=0")
        x, begin = _pad_input(x, begin, end), [0] * k
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[k]
    return [fn(x, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include)]


@op("Flatten")
def _flatten(node, ins, opset):
    x = ins[0]
    axis = node.attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return [x.reshape(lead, -1)]


@op("Shape")
def _shape(node, ins, opset):
    dims = list(ins[0].shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return [_t().tensor(dims[start:end], dtype=_t().int64)]


@op("Size")
def _size(node, ins, opset):
    return [_t().tensor(ins[0].numel(), dtype=_t().int64)]


@op("Reshape")
def _reshape(node, ins, opset):
    x = ins[0]
    shape = _ints(ins[1])
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@op("Transpose")
def _transpose(node, ins, opset):
    x = ins[0]
    perm = node.attrs.get("perm", list(range(x.dim()))[::-1])
    return [x.permute(*perm)]


def _axes(node, ins, opset, since: int, index: int = 1) -> list[int] | None:
    """Axes from the attribute (before `since`) or from input `index` (from `since` on)."""
    if opset < since:
        a = node.attrs.get("axes")
        return list(a) if a is not None else None
    if len(ins) > index and ins[index] is not None:
        return _ints(ins[index])
    return None


@op("Squeeze")
def _squeeze(node, ins, opset):
    x = ins[0]
    axes = _axes(node, ins, opset, 13)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = sorted(a % x.dim() for a in axes)
    for a in reversed(axes):
        x = x.squeeze(a)
    return [x]


@op("Unsqueeze")
def _unsqueeze(node, ins, opset):
    x = ins[0]
    axes = _axes(node, ins, opset, 13)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return [x]


@op("Concat")
def _concat(node, ins, opset):
    parts = [x for x in ins if x is not None]
    dtype = parts[0].dtype
    return [_t().cat([p.to(dtype) for p in parts], dim=node.attrs["axis"])]


@op("Split")
def _split(node, ins, opset):
    x = ins[0]
    axis = node.attrs.get("axis", 0)
    n = len(node.outputs)
    if opset < 13:
        sizes = node.attrs.get("split")
    else:
        sizes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    if sizes is None:
        dim = x.shape[axis]
        n = node.attrs.get("num_outputs", n)
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    return list(_t().split(x, list(sizes), dim=axis))


@op("Slice")
def _slice(node, ins, opset):
    x = ins[0]
    if opset < 10:
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes"), None
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        dim = x.shape[a]
        if st > 0:
            s = min(max(s + dim if s < 0 else s, 0), dim)
            e = min(max(e + dim if e < 0 else e, 0), dim)
            x = x.narrow(a, s, max(0, e - s))[tuple([slice(None)] * a + [slice(None, None, st)])] \
                if st != 1 else x.narrow(a, s, max(0, e - s))
        else:
            s = min(max(s + dim if s < 0 else s, -1), dim - 1)
            e = min(max(e + dim if e < 0 else e, -1), dim - 1)
            idx = _t().arange(s, e, st, device=x.device)
            x = x.index_select(a, idx)
    return [x]


@op("Gather")
def _gather(node, ins, opset):
    x, idx = ins
    axis = node.attrs.get("axis", 0) % x.dim()
    idx = _t().where(idx < 0, idx + x.shape[axis], idx).long()
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


@op("Expand")
def _expand(node, ins, opset):
    x, shape = ins[0], _ints(ins[1])
    # ONNX Expand broadcasts both ways (a 1 in `shape` keeps x's dim).
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ss = [1] * (rank - len(shape)) + shape
    target = [max(a, b) if min(a, b) == 1 else b for a, b in zip(xs, ss)]
    return [x.reshape(xs).expand(target)]


@op("Tile")
def _tile(node, ins, opset):
    return [ins[0].repeat(*_ints(ins[1]))]


@op("ConstantOfShape")
def _constant_of_shape(node, ins, opset):
    value = node.attrs.get("value")
    v = np.asarray(value).reshape(-1)[0] if value is not None else np.float32(0)
    dtype = _t().from_numpy(np.zeros(0, dtype=np.asarray(v).dtype)).dtype
    return [_t().full(_ints(ins[0]), _t().tensor(v).item(), dtype=dtype)]


@op("Range")
def _range(node, ins, opset):
    start, limit, delta = ins
    return [_t().arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


@op("Pad")
def _pad(node, ins, opset):
    x = ins[0]
    mode = node.attrs.get("mode", "constant")
    if opset < 11:
        pads, value, axes = list(node.attrs["pads"]), node.attrs.get("value", 0.0), None
    else:
        pads = _ints(ins[1])
        value = ins[2].item() if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    axes = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    k = len(axes)
    begin = {a: pads[i] for i, a in enumerate(axes)}
    end = {a: pads[k + i] for i, a in enumerate(axes)}
    flat = []
    for a in reversed(range(x.dim())):
        flat += [begin.get(a, 0), end.get(a, 0)]
    while len(flat) > 2 and flat[-2:] == [0, 0]:
        flat = flat[:-2]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise UnsupportedOpError(f"Pad mode {mode}")
    if torch_mode == "constant":
        return [_F().pad(x, flat, value=value)]
    return [_F().pad(x, flat, mode=torch_mode)]


_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax", "ReduceMin": "amin",
           "ReduceProd": "prod", "ReduceL2": "l2", "ReduceSumSquare": "sumsq", "ReduceL1": "l1"}


@op(*_REDUCE)
def _reduce(node, ins, opset):
    torch = _t()
    x = ins[0]
    since = 13 if node.op == "ReduceSum" else 18
    axes = _axes(node, ins, opset, since)
    keep = bool(node.attrs.get("keepdims", 1))
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.dim()))
    axes = sorted(a % x.dim() for a in axes)
    kind = _REDUCE[node.op]
    if kind == "prod":
        for a in reversed(axes):
            x = x.prod(dim=a, keepdim=keep)
        return [x]
    if kind == "l2":
        return [torch.sqrt((x * x).sum(dim=axes, keepdim=keep))]
    if kind == "sumsq":
        return [(x * x).sum(dim=axes, keepdim=keep)]
    if kind == "l1":
        return [x.abs().sum(dim=axes, keepdim=keep)]
    return [getattr(x, kind)(dim=axes, keepdim=keep)]


@op("ArgMax", "ArgMin")
def _arg(node, ins, opset):
    x = ins[0]
    axis, keep = node.attrs.get("axis", 0), bool(node.attrs.get("keepdims", 1))
    if node.attrs.get("select_last_index", 0):
        raise UnsupportedOpError(f"{node.op} with select_last_index=1")
    fn = _t().argmax if node.op == "ArgMax" else _t().argmin
    return [fn(x, dim=axis, keepdim=keep)]
