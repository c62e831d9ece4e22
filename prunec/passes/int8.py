"""`int8`: static int8 quantization with ONNX Runtime's tools, calibrated on the model it receives.

Quantizing a pruned model with activation ranges measured on the original is a known way to lose
3-7 points: pruning and recovery move the ranges. This pass measures them on the graph it is given
(after `channels`, `distill` or any recovery), running `ctx.calib` through it with ONNX Runtime's
calibrators, then writes QDQ (QuantizeLinear/DequantizeLinear) pairs with per-channel int8 weights
(`onnxruntime.quantization.quantize_static`). The output keeps float inputs and outputs, so the
interface check, the accuracy gate and the closing latency comparison apply as for any pass.

Defaults follow ONNX Runtime's guidance for CPU: QDQ format, symmetric int8 weights per output
channel, activations with a zero point (uint8 on x86-64, where ONNX Runtime's u8s8 kernels are the
fast ones; int8 elsewhere), `quant_pre_process` first (shape inference and graph optimization).
The first and the last Conv/ConvTranspose/Gemm/MatMul stay in float (`keep-first-last`): the
first reads raw inputs with few channels and costs little, and the last writes the outputs the
user reads; keeping both is the common practice in post-training quantization recipes.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from prunec.errors import OptionError
from prunec.passes.base import Pass, PassContext, PassResult, Skip, option, register

#: DequantizeLinear takes a per-channel `axis` from this opset on; older models are converted.
PER_CHANNEL_OPSET = 13
#: Layers counted for keep-first-last.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@register
class Int8(Pass):
    name = "int8"
    summary = ("Static int8 (QDQ, per-channel weights) with ONNX Runtime's quantizer, calibrated on the "
               "model this pass receives (--calib data); first/last layers stay float.")
    exact = False

    @dataclass
    class Options:
        method: Literal["minmax", "entropy", "percentile"] = option(
            "minmax", "Activation range calibration: minmax, entropy (KL) or percentile.")
        percentile: float = option(99.999, "Percentile of |activation| kept when method=percentile.")
        per_channel: bool = option(True, "One weight scale per output channel (else per tensor).")
        activations: Literal["auto", "int8", "uint8"] = option(
            "auto", "Activation type (weights are always int8). auto: uint8 on x86-64, where ONNX Runtime's "
                    "u8s8 kernels are the fast ones (int8 activations measured 1.5-2.7x slower on the demo), "
                    "int8 elsewhere.")
        reduce_range: bool = option(False, "7-bit weights, for x86 CPUs without VNNI (avoids saturation).")
        op_types: list[str] = option([], "Op types to quantize (comma list; empty: every op ONNX Runtime "  # noqa: RUF009  (option() makes a default_factory for lists)
                                         "can quantize).")
        exclude: str = option("", "Regex of node names kept in float.")
        keep_first_last: bool = option(True, "Keep the first and last Conv/ConvTranspose/Gemm/MatMul in float.")
        preprocess: bool = option(True, "Run onnxruntime's quant_pre_process (shape inference and "
                                        "optimization) before quantizing.")
        samples: int = option(256, "Calibration samples used (entropy and percentile keep histograms "
                                   "of every tensor, so this bounds memory and time; 0: all).")
        batch: int = option(16, "Calibration samples per ONNX Runtime run (1 when the model's batch is fixed).")
        calibrate_on: Literal["input", "baseline"] = option(
            "input", "input: ranges measured on the model this pass receives. baseline: on the run's "
                     "model before its first lossy pass; wrong after pruning, kept only to measure the "
                     "cost of doing so.")

        def validate(self) -> None:
            if self.samples < 0 or self.batch < 1:
                raise OptionError("int8.samples must be >= 0 and int8.batch >= 1")
            if not 0 < self.percentile <= 100:
                raise OptionError(f"int8.percentile must be in (0, 100], got {self.percentile}")
            if self.exclude:
                try:
                    re.compile(self.exclude)
                except re.error as exc:
                    raise OptionError(f"int8.exclude: not a valid regex: {exc}") from None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import QuantFormat, QuantType

        from prunec.graph.ir import from_onnx

        o = self.options
        calib = ctx.require_calib("int8")
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        skipped: list[Skip] = []
        per_channel, opset_note = o.per_channel, None
        if per_channel and _opset(model) < PER_CHANNEL_OPSET:
            before = _opset(model)
            model, opset_note = _raise_opset(model)
            if opset_note is None:
                opset_note = f"opset {before} -> {PER_CHANNEL_OPSET} (onnx.version_converter)"
            else:
                per_channel = False
                skipped.append(Skip("per-channel weights", opset_note))
        with tempfile.TemporaryDirectory(prefix="prunec-int8-") as d:
            tmp = Path(d)
            target, pre_note = _prepare(model, tmp / "target", o.preprocess)
            if pre_note:
                skipped.append(Skip("preprocess", pre_note))
            excluded = _excluded_nodes(target, o)
            source = target
            if o.calibrate_on == "baseline":
                if ctx.baseline is None:
                    raise OptionError("int8.calibrate-on=baseline needs the run's baseline model")
                base = ctx.baseline
                if per_channel and _opset(base) < PER_CHANNEL_OPSET:
                    base, _ = _raise_opset(base)
                source, _ = _prepare(base, tmp / "baseline", o.preprocess)
            samples = calib.n if o.samples == 0 else min(o.samples, calib.n)
            reader = _Reader({k: np.asarray(v[:samples]) for k, v in calib.inputs.items()},
                             _input_names(target), 1 if _fixed_batch(target) == 1 else o.batch)
            common = {
                "quant_format": QuantFormat.QDQ, "per_channel": per_channel, "reduce_range": o.reduce_range,
                "activation_type": QuantType.QInt8 if _activation_type(o.activations) == "int8" else QuantType.QUInt8,
                "weight_type": QuantType.QInt8, "nodes_to_exclude": excluded,
                "op_types_to_quantize": list(o.op_types) or None, "calibrate_method": _method(o.method),
                "extra_options": _extra_options(o)}
            out = tmp / "int8.onnx"
            if source is target:
                _quantize(target, out, reader, None, common)
            else:  # ranges measured on the baseline, written to a cache, then applied to the target
                cache = tmp / "ranges.json"
                _quantize(source, tmp / "baseline-int8.onnx", reader, cache, common)
                _quantize(target, out, None, cache, common)
            qmodel = onnx.load(str(out))
        counts = _qdq_counts(qmodel)
        new = from_onnx(qmodel)
        graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
        graph.opset, graph.import_domains = new.opset, new.import_domains
        details = {"method": o.method, "per_channel": per_channel, "opset": opset_note,
                   "activations": _activation_type(o.activations),
                   "calibrated_on": "the model this pass received" if o.calibrate_on == "input"
                   else "the run's baseline (before the first lossy pass)",
                   "calibration": calib.source, "samples": samples, "preprocess": o.preprocess and not pre_note,
                   "kept_float": excluded, **counts}
        if counts["quantized_layers"] == 0:
            skipped.append(Skip("int8", "no layer was quantized (check int8.op-types and exclusions)"))
        return PassResult(counts["quantized_layers"] > 0, details, skipped)


def _opset(model: onnx.ModelProto) -> int:
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)


def _raise_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The model converted to PER_CHANNEL_OPSET (ONNX's version converter rewrites the ops whose
    definition changed), or the unchanged model and why it could not be converted."""
    from onnx import version_converter

    before = _opset(model)
    try:
        converted = version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001  (the converter raises anything; per-tensor still works)
        return model, (f"per-channel scales need opset {PER_CHANNEL_OPSET} (DequantizeLinear axis) and "
                       f"converting opset {before} failed ({str(exc).splitlines()[0][:120]}); "
                       "weights quantized per tensor")
    return converted, None


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _activation_type(choice: str) -> str:
    """'int8' or 'uint8': `auto` follows ONNX Runtime's CPU guidance (u8s8 on x86-64)."""
    import platform

    if choice != "auto":
        return choice
    return "uint8" if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") else "int8"


def _extra_options(o) -> dict:
    return {"CalibPercentile": o.percentile}


def _save(model: onnx.ModelProto, path: Path) -> Path:
    large = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    return path


def _prepare(model: onnx.ModelProto, stem: Path, preprocess: bool) -> tuple[Path, str | None]:
    """Save `model` with every node named (exclusions need names), preprocessed when asked;
    returns the path and, if preprocessing failed, why (the model is then used as it was)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _name_nodes(m)
    raw = _save(m, stem.with_suffix(".onnx"))
    if not preprocess:
        return raw, None
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = stem.with_name(stem.name + "-pre.onnx")
    try:
        # ONNX Runtime's symbolic shape inference drops a scratch file in the working directory
        # when it cannot infer every shape: keep it in our temp folder.
        with contextlib.chdir(stem.parent):
            quant_pre_process(str(raw), str(pre), skip_symbolic_shape=False)
    except Exception as exc:  # noqa: BLE001  (ORT and its shape inference raise anything; the raw model still quantizes)
        return raw, f"quant_pre_process failed ({str(exc).splitlines()[0][:160]}); quantized without it"
    pm = onnx.load(str(pre))
    _name_nodes(pm)
    return _save(pm, pre), None


def _name_nodes(model: onnx.ModelProto) -> None:
    taken = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)


def _excluded_nodes(path: Path, o) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    nodes = list(model.graph.node)
    out = [n.name for n in nodes if o.exclude and re.search(o.exclude, n.name)]
    if o.keep_first_last:
        compute = [n.name for n in nodes if n.op_type in COMPUTE_OPS]
        out += compute[:1] + compute[-1:]
    return list(dict.fromkeys(out))


def _input_names(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _fixed_batch(path: Path) -> int | None:
    from prunec.passes.teacher import fixed_batch

    return fixed_batch(onnx.load(str(path), load_external_data=False))


def _quantize(model: Path, out: Path, reader, cache: Path | None, common: dict) -> None:
    """quantize_static; with `cache`, the activation ranges are written there (when `reader`
    measures them) or read from there (when `reader` is None)."""
    from onnxruntime.quantization import quantize_static

    kw = {"calibration_cache_path": str(cache)} if cache is not None else {}
    quantize_static(str(model), str(out), _as_reader(reader) if reader else None, **kw, **common)


def _qdq_counts(model: onnx.ModelProto) -> dict:
    ops = [n.op_type for n in model.graph.node]
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    layers = sum(1 for n in model.graph.node if n.op_type in COMPUTE_OPS
                 and len(n.input) > 1 and n.input[1] in dq_out)
    return {"quantize_nodes": ops.count("QuantizeLinear"), "dequantize_nodes": ops.count("DequantizeLinear"),
            "quantized_layers": layers}


def _as_reader(reader: _Reader):
    """Wrap `reader` in ONNX Runtime's CalibrationDataReader interface."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def __len__(self):
            return len(reader)

        def set_range(self, start_index: int, end_index: int):
            reader.set_range(start_index, end_index)

    return Reader()


class _Reader:
    """The calibration arrays as batches of feeds, in order."""

    def __init__(self, arrays: dict[str, np.ndarray], names: list[str], batch: int):
        missing = [n for n in names if n not in arrays]
        if missing:
            raise OptionError(f"int8: calibration data has no array for input(s) {', '.join(missing)}")
        self.arrays = {n: arrays[n] for n in names}
        self.n = len(next(iter(self.arrays.values())))
        self.batch = batch
        self.pos = 0

    def get_next(self):
        if self.pos >= self.n:
            return None
        s = slice(self.pos, self.pos + self.batch)
        self.pos += self.batch
        return {k: v[s] for k, v in self.arrays.items()}

    def __len__(self) -> int:
        return max(0, -(-self.n // self.batch))

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos = start_index
