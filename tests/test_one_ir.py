"""One graph through a run (issue 17): what a run costs, counted, and the store it runs through.

The counters (`prunec.counters`) record every import, export, whole-model serialization, checker
run and ONNX Runtime session; a regression that brings back an export per helper or a session per
check changes these numbers. Models over 2 GB are exercised by `benchmarks/scale.py memory` (a
2.5 GB model end to end), not here: it needs gigabytes of memory and disk, which a unit test on a
2-core CI machine must not take. Here the same code paths run on small models: the checker and
ONNX Runtime always read a store's file, and the external-data writer is forced.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from prunec.counters import counting
from prunec.graph.io import load_model, save_model
from prunec.graph.ir import from_onnx, model_template, normalize
from prunec.graph.store import Store
from prunec.passes import PassManager, build_passes
from prunec.passes.base import Pass, PassResult
from prunec.runtime.inputs import random_inputs, resolve_input_shapes
from prunec.runtime.session import make_session, run_session


def _run(path, passes: str):
    """A run as `prunec run` does it: the LoadedModel handed over, the result left in a store."""
    store = Store()
    with counting() as c:
        result, report = PassManager(build_passes(passes.split(","), {})).run_in(store, load_model(path))
    return store, result, report, Counter(dict(c))


def test_a_three_pass_run_imports_once_and_serializes_nothing(demo_path):
    store, _, report, c = _run(demo_path, "fold-bn,cleanup,channels")
    try:
        assert c["import"] == 1            # the input, once; no pass re-imports its predecessor
        assert c["serialize"] == 0         # no whole model turned into bytes: everything reads the store
        assert c["materialize"] == 0       # nor built back into a ModelProto
        assert c["export"] == 4            # one per pass, and the channels proof's masked original
        assert c["checker"] == 3           # the input file, fold-bn's and channels' results (not cleanup's)
        # The original, fold-bn's and channels' results, and the proof's reference: one session each.
        assert c["session"] == 4
        assert [p.verification.identical for p in report.passes] == [False, True, False]
    finally:
        store.close()


def test_an_api_run_serializes_the_input_once_and_returns_a_whole_model(demo_model):
    with counting() as c:
        out, _ = PassManager(build_passes(["fold-bn"], {})).run(demo_model)
    assert c["serialize"] == 1     # the caller's ModelProto, for the original's session
    assert c["materialize"] == 1   # the result handed back as one ModelProto
    assert all(t.HasField("raw_data") or t.float_data or t.int64_data for t in out.graph.initializer)
    onnx.checker.check_model(out)


def test_a_pass_that_changes_nothing_is_not_run_again(demo_path):
    store, _, report, c = _run(demo_path, "fold-bn,fold-bn")
    store.close()
    assert c["session"] == 2 and c["checker"] == 2   # the input, and the first fold-bn only
    second = report.passes[1].verification
    assert second.identical and second.exact
    assert all(d.max_abs == 0 and d.cosine == 1 for d in second.deviation.values())
    assert report.passes[1].after == report.passes[0].after


def test_channels_requires_folded_constants_and_the_manager_folds_once(demo_path):
    store, _, _, once = _run(demo_path, "channels")
    store.close()
    store, _, _, twice = _run(demo_path, "channels,channels")
    store.close()
    # channels preserves "folded": the second run of it folds nothing.
    assert once["fold"] >= 1 and twice["fold"] == once["fold"]


class _EditInPlace(Pass):
    name = "edit-in-place"
    summary = "test pass: scales a weight without replacing its array"

    def run(self, graph, ctx):
        # The largest kernel: its bytes live in the store's data file, not in the skeleton.
        w = max((t for t in graph.tensors().values() if isinstance(t, gs.Constant)), key=lambda t: t.values.nbytes)
        np.asarray(w.values)[...] *= 2
        return PassResult(changed=True)


def test_weights_are_read_only_so_an_in_place_edit_cannot_go_unseen(demo_model):
    # The store writes an array once and refers to those bytes from then on; an edit in place
    # would change the graph without changing what the checks run. It fails instead.
    # fold-bn writes new kernels; once exported, they are frozen like the imported ones.
    with pytest.raises(ValueError, match="read-only"):
        PassManager([*build_passes(["fold-bn"], {}), _EditInPlace()]).run(demo_model)


def test_an_array_is_written_once_whatever_the_number_of_exports(demo_model):
    graph = normalize(from_onnx(demo_model, own_weights=True))
    template = model_template(demo_model)
    with Store() as store, counting() as c:
        a = store.export(graph, template, "a")
        written = c["weights_written"]
        b = store.export(graph, template, "b")
        assert c["weights_written"] == written > 0
        assert a.skeleton.SerializeToString() == b.skeleton.SerializeToString()
        assert a.weight_bytes == sum(numpy_helper.to_array(t).nbytes for t in demo_model.graph.initializer
                                     if numpy_helper.to_array(t).nbytes >= 1024)


def _outputs(model_or_path, feeds) -> dict:
    return run_session(make_session(model_or_path), feeds)


@pytest.mark.parametrize("external", [False, True])
def test_the_output_is_streamed_from_the_store_and_is_the_verified_model(demo_path, tmp_path, external):
    store, result, _, _ = _run(demo_path, "fold-bn")
    try:
        out = tmp_path / "out.onnx"
        save_model(result, out, external_data=external)
        assert (tmp_path / "out.onnx.data").exists() == external
        onnx.checker.check_model(str(out))
        written, whole = onnx.load(str(out)), result.load()
        assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in whole.graph.node]
        assert {t.name: numpy_helper.to_array(t).tobytes() for t in written.graph.initializer} == \
            {t.name: numpy_helper.to_array(t).tobytes() for t in whole.graph.initializer}
        feeds = random_inputs(whole, resolve_input_shapes(whole))
        for k, v in _outputs(str(out), feeds).items():
            np.testing.assert_array_equal(v, _outputs(result.path, feeds)[k])
    finally:
        store.close()


def test_a_model_with_external_data_runs_end_to_end(prunec_cli, demo_model, tmp_path):
    src = tmp_path / "in.onnx"
    m = onnx.ModelProto()
    m.CopyFrom(demo_model)
    onnx.save_model(m, str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    res = prunec_cli("run", src, "--passes", "fold-bn,channels", "-o", tmp_path / "out.onnx", "--no-profile")
    assert res.exit_code == 0, res.output
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prunec-run-")]  # the store is gone


def test_a_released_input_is_read_again_when_asked_for(demo_path, demo_model):
    loaded = load_model(demo_path)
    taken = loaded.release()
    assert taken.SerializeToString() == demo_model.SerializeToString()
    assert loaded.model is not taken
    assert loaded.model.SerializeToString() == demo_model.SerializeToString()


def test_costs_are_kept_when_a_pass_changes_weight_values_only(demo_path, monkeypatch):
    import prunec.passes.manager as manager

    analysed = []
    real = manager.analyze_costs
    monkeypatch.setattr(manager, "analyze_costs", lambda model, *a, **k: analysed.append(1) or real(model, *a, **k))
    store, _, report, _ = _run(demo_path, "fold-bn,sparsity")
    store.close()
    # The input and fold-bn's result; sparsity zeroes values, so its shapes and costs are fold-bn's.
    assert len(analysed) == 2
    assert report.passes[1].result.changed and report.passes[1].after == report.passes[0].after


class _ScaleLargest(Pass):
    name = "scale-largest"
    summary = "test pass: replaces the largest weight by a scaled copy (same shape)"
    exact = False

    def run(self, graph, ctx):
        w = max((t for t in graph.tensors().values() if isinstance(t, gs.Constant)), key=lambda t: t.values.nbytes)
        w.values = np.asarray(w.values) * 1.5
        return PassResult(changed=True)


def test_costs_are_kept_when_only_stored_weight_bytes_differ(demo_model, monkeypatch):
    import prunec.passes.manager as manager

    analysed = []
    real = manager.analyze_costs
    monkeypatch.setattr(manager, "analyze_costs", lambda model, *a, **k: analysed.append(1) or real(model, *a, **k))
    _, report = PassManager([*build_passes(["fold-bn"], {}), _ScaleLargest()]).run(demo_model)
    assert len(analysed) == 2 and report.passes[1].after == report.passes[0].after


# -- A single-file input's weights are read once, from the file into arrays ---------------------

def test_a_single_file_input_is_opened_without_parsing_its_weights(demo_path, demo_model):
    loaded = load_model(demo_path, lazy_weights=True)
    sk = loaded.skeleton
    assert sk is not None and loaded._model is None  # the whole protobuf was never built
    assert sk.ByteSize() < demo_path.stat().st_size / 10
    raw = demo_path.read_bytes()
    whole = {t.name: t for t in demo_model.graph.initializer}
    cut = 0
    for t in sk.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == demo_path.name  # the weights stay where they are: in the .onnx file
            start, n = int(info["offset"]), int(info["length"])
            assert raw[start:start + n] == whole[t.name].raw_data
            cut += n
        else:
            assert t.SerializeToString() == whole[t.name].SerializeToString()
    assert cut > 0.9 * sum(len(t.raw_data) for t in demo_model.graph.initializer)
    # The graph reads them straight from the file: the same arrays as a whole load gives.
    graph = from_onnx(sk, own_weights=True, base_dir=demo_path.parent)
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Constant) and name in whole:
            np.testing.assert_array_equal(t.values, numpy_helper.to_array(whole[name]))
    assert loaded.model.SerializeToString() == demo_model.SerializeToString()  # read when asked for


@pytest.mark.parametrize("external", [False, True])
def test_a_lazily_opened_input_runs_to_the_same_result(demo_model, tmp_path, external):
    src = tmp_path / "in.onnx"
    m = onnx.ModelProto()
    m.CopyFrom(demo_model)  # saving as external data edits the model it is given
    onnx.save_model(m, str(src), save_as_external_data=external, location="in.onnx.data", size_threshold=0)
    outs = []
    for lazy in (False, True):
        with Store() as store, counting() as c:
            result, _ = PassManager(build_passes(["fold-bn", "cleanup", "channels"], {})).run_in(
                store, load_model(src, lazy_weights=lazy))
            outs.append(result.load().SerializeToString())
            assert c["import"] == 1 and c["serialize"] == 0
    assert outs[0] == outs[1]


# -- A pass that replaces every weight does not hold them all twice -----------------------------
# (channels keeps the originals on purpose: its masked-original proof reads them.)

def _wide_conv_bn(layers: int = 16, c: int = 96):
    """Conv+BN layers whose 3x3 weights (c*c*9 floats, 0.33 MB each) dwarf everything else, and
    each of which is small beside all of them (a pass may hold one layer's temporaries)."""
    from models import bn_node, bn_params, init, make_model, rng, vi

    r = rng(3)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(init(f"w{i}", (r.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32)))
        inits += bn_params(f"bn{i}", c, seed=i)
        nodes.append(onnx.helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(bn_node(f"c{i}", f"b{i}", f"bn{i}"))
        nodes.append(onnx.helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    model = make_model(nodes, [vi("x", [1, c, 4, 4])], [vi(x, [1, c, 4, 4])], inits)
    return model, layers * c * c * 9 * 4


def test_fold_bn_frees_each_weight_it_replaces():
    import gc
    import tracemalloc

    from prunec.passes.manager import CONDITIONS

    p = build_passes(["fold-bn"], {})[0]
    ctx = PassManager([p]).ctx
    gc.collect()
    gc.disable()  # what the cycle collector would free by chance must be freed by the pass
    tracemalloc.start()  # before the weights are made, so that freeing them counts
    try:
        model, weights = _wide_conv_bn()
        graph = from_onnx(model, own_weights=True)
        del model
        for cond in sorted(p.requires()):
            CONDITIONS[cond](graph, ctx)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        assert p.run(graph, ctx).changed
        extra = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
        gc.enable()
    # Without freeing, the new weights (0.81-1x of the old) pile up beside the old ones.
    assert extra < 0.5 * weights, f"{extra / 1e6:.1f} MB more for {weights / 1e6:.1f} MB of weights"


def test_prunec_run_reads_its_input_once(prunec_cli, demo_path, tmp_path):
    """Everything `prunec run` needs of the input besides the run (feeds, sized dims, --calib
    checks) reads the skeleton: reading `loaded.model` would parse the whole file again."""
    with counting() as c:
        res = prunec_cli("run", demo_path, "--passes", "fold-bn,cleanup,channels", "-o", tmp_path / "o.onnx",
                         "--no-profile")
    assert res.exit_code == 0, res.output
    assert c["import"] == 1
    assert c["checker"] == 3  # the input (once, by path), fold-bn's and channels' results


def test_costs_of_a_lazily_opened_quantized_model_count_every_layer(tmp_path):
    """com.microsoft ops (QLinearAdd, QGemm) have shapes only a run gives; the run needs the
    weights a lazily opened input and the store's skeletons keep in their files. Costs before
    and after `channels` must be those of the whole models."""
    import exporters
    import zoo

    from prunec.graph.costs import analyze_costs

    a = zoo.ZOO["resnet_basic"]
    q = exporters.quantize(zoo.export(zoo.build("resnet_basic").original, a.hw, keep_bn=False), a.hw,
                           tmp_path, "QOperator")
    assert any(n.domain == "com.microsoft" for n in q.graph.node)
    path = tmp_path / "q.onnx"
    onnx.save(q, path)
    loaded = load_model(path, lazy_weights=True)
    assert loaded.skeleton is not None
    out, report = PassManager(build_passes(["channels"], {"channels": {"ratio": "0.5", "round": "1"}})).run(loaded)
    assert report.before.macs == analyze_costs(q).macs
    assert report.after.macs == analyze_costs(out).macs < report.before.macs
