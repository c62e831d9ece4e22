"""The `channels` pass against hand-built zero-channel oracles (tests/zoo.py).

For every zoo architecture the oracle zeroes a random half of each prunable channel group in a
wide torch model and slices the same channels out of a narrow twin. Pruning the wide ONNX export
at ratio 0.5 with L1 importance must then (1) reproduce the wide outputs, (2) have exactly the
narrow export's parameter count, and (3) pass the ONNX checker. The oracle is first checked on
its own (torch and ONNX Runtime), so a failure of the pass test is the pass's, not the oracle's.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import zoo  # tests/ is on sys.path (see conftest.py)

from prunec.graph.costs import analyze_costs

ARCHS = list(zoo.ZOO)
#: Export variants: BatchNormalization kept; folded into Conv by torch's default eval export;
#: folded with a static batch of 2 (shape constants baked in, e.g. the shuffle's Reshape).
VARIANTS = {"bn": dict(keep_bn=True), "folded": dict(keep_bn=False),
            "static": dict(keep_bn=False, dynamic=False)}
SELF_TOL = 1e-5
PRUNE_TOL = 1e-4


# -- session caches ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def oracle():
    """Oracle per architecture, built once per session."""
    cache: dict[str, zoo.Oracle] = {}

    def get(name: str) -> zoo.Oracle:
        if name not in cache:
            cache[name] = zoo.build(name, seed=0)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def exported(oracle):
    """(wide ONNX, narrow ONNX) per architecture and export variant, exported once per session."""
    cache: dict[tuple[str, str], tuple[onnx.ModelProto, onnx.ModelProto]] = {}

    def get(name: str, variant: str):
        key = (name, variant)
        if key not in cache:
            o, hw = oracle(name), zoo.ZOO[name].hw
            cache[key] = (zoo.export(o.wide, hw, **VARIANTS[variant]),
                          zoo.export(o.narrow, hw, **VARIANTS[variant]))
        return cache[key]
    return get


@pytest.fixture(scope="session")
def pruned(exported):
    """The wide export after `channels` (ratio 0.5, l1), run once per architecture and variant."""
    cache: dict[tuple[str, str], onnx.ModelProto] = {}

    def get(name: str, variant: str) -> onnx.ModelProto:
        key = (name, variant)
        if key not in cache:
            cache[key] = prune(exported(name, variant)[0])
        return cache[key]
    return get


# -- helpers ----------------------------------------------------------------------------------

def prune(model: onnx.ModelProto, **options: str) -> onnx.ModelProto:
    """Run the `channels` pass through the public pass API: ratio 0.5, l1, round 1 (the oracle
    removes exactly floor(n/2) per group; round's default of 8 is tested separately)."""
    from prunec.passes import PassManager, build_passes
    opts = {"ratio": "0.5", "importance": "l1", "round": "1", **options}
    passes = build_passes(["channels"], {"channels": opts})
    out, _ = PassManager(passes).run(model)
    return out


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """All outputs of `model` on x, ONNX Runtime CPU, one thread."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def model_inputs(model: onnx.ModelProto, hw: int) -> np.ndarray:
    """Random inputs at the model's static batch, or batch 3 where it is symbolic."""
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return inputs(hw, batch=d.dim_value or 3)


def inputs(hw: int, batch: int = 3, seed: int = 1) -> np.ndarray:
    """Random NCHW batch; batch 3 differs from the export batch (2), exercising the dynamic axis."""
    return np.random.default_rng(seed).standard_normal((batch, 3, hw, hw)).astype(np.float32)


def params(model: onnx.ModelProto) -> int:
    """Float parameter count by prunec's one counter."""
    return analyze_costs(model).params


def check_pruned(wide: onnx.ModelProto, narrow: onnx.ModelProto, got: onnx.ModelProto,
                 hw: int) -> None:
    """The three requirements of a correct pruning of an oracle-zeroed wide model."""
    onnx.checker.check_model(got, full_check=True)
    x = model_inputs(wide, hw)
    ref, out = run_ort(wide, x), run_ort(got, x)
    assert [o.shape for o in out] == [r.shape for r in ref], \
        f"graph output shapes changed: {[o.shape for o in out]} != {[r.shape for r in ref]}"
    err = zoo.rel_err(ref, out)
    assert err <= PRUNE_TOL, f"pruned outputs differ from the wide model: rel {err:.3g}"
    pw, pn, pg = params(wide), params(narrow), params(got)
    assert pg == pn, (f"pruned params {pg} != oracle narrow params {pn} (wide {pw}): "
                      f"{'too few' if pg > pn else 'too many'} channels removed")


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _shapes_into(model: onnx.ModelProto, op_types: set[str], x: np.ndarray) -> list[tuple]:
    """Run-time shapes (batch dropped) of the first input of every node of the given types.

    Read from ONNX Runtime, because static shape inference loses the channel count through the
    Shape-computed Reshapes that torch exports for shuffles and LRN."""
    names = [n.input[0] for n in model.graph.node if n.op_type in op_types]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                          for t in dict.fromkeys(names))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sorted(tuple(v.shape[1:]) for v in sess.run(None, {"x": x}))


#: Channel-mixing ops of the `traps` model: Softmax over C, CumSum over C, and the x / norm
#: of the LRN decomposition torch exports.
MIXING = {"Softmax", "CumSum", "Div"}


# -- the oracle on its own --------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_oracle_torch_wide_zeroed_equals_narrow(name, oracle):
    o = oracle(name)
    x = inputs(zoo.ZOO[name].hw)
    wide, narrow = zoo.torch_outputs(o.wide, x), zoo.torch_outputs(o.narrow, x)
    assert zoo.rel_err(wide, narrow) <= SELF_TOL
    # Control: the zeroing matters, so equality above is not vacuous.
    assert zoo.rel_err(wide, zoo.torch_outputs(o.original, x)) > 1e-3
    assert zoo.n_params(o.narrow) < zoo.n_params(o.wide)
    for g in o.groups:
        assert g["removed"] == (0 if g["frozen"] else g["n"] // 2), g


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ARCHS)
def test_oracle_onnx_exports_agree(name, variant, oracle, exported):
    wide, narrow = exported(name, variant)
    x = model_inputs(wide, zoo.ZOO[name].hw)
    rw = run_ort(wide, x)
    assert zoo.rel_err(zoo.torch_outputs(oracle(name).wide, x), rw) <= SELF_TOL
    assert zoo.rel_err(rw, run_ort(narrow, x)) <= SELF_TOL
    assert params(narrow) < params(wide)
    n_bn = sum(n.op_type == "BatchNormalization" for n in wide.graph.node)
    n_bn_modules = sum(isinstance(m, zoo.nn.BatchNorm2d) for m in oracle(name).wide.modules())
    if variant == "bn":
        assert n_bn == n_bn_modules
    elif n_bn_modules:
        assert n_bn < n_bn_modules   # torch folded at least the Conv->BN pairs


#: Architectures Torch-Pruning cannot check: it mis-tracks the channel shuffle's Reshape and
#: fails (IndexError) on the C2f Split; `traps` only agrees because frozen groups are skipped.
TP_UNSUPPORTED = {"shufflenet_v2", "yolo"}


@pytest.mark.parametrize("name", [a for a in ARCHS if a not in TP_UNSUPPORTED])
@pytest.mark.filterwarnings("ignore:Unwrapped parameters")  # ConvNeXt's layer scale
def test_oracle_coupling_agrees_with_torch_pruning(name):
    """An independent check of the hand-written `chan` methods: for every prunable producer
    channel, Torch-Pruning's dependency group touches the same weight slices as the oracle's."""
    tp = pytest.importorskip("torch_pruning")
    arch = zoo.ZOO[name]
    zoo.torch.manual_seed(0)
    model = zoo.randomize(arch.build(), 0)
    names = {id(m): n for n, m in model.named_modules()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=zoo.torch.randn(1, 3, arch.hw,
                                                                                    arch.hw))
    tr, by_class, frozen = zoo.coupled_slices(model)
    checked = 0
    for mod, atoms in tr.producers:
        if mod is None:
            continue
        fn = tp.prune_linear_out_channels if isinstance(mod, zoo.nn.Linear) \
            else tp.prune_conv_out_channels
        for i, atom in enumerate(atoms):
            c = tr.find(int(atom))
            if c in frozen:
                continue
            theirs = {(names[id(dep.target.module)],
                       "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in", int(j))
                      for dep, idxs in dg.get_pruning_group(mod, fn, idxs=[i])
                      if isinstance(dep.target.module, zoo.WEIGHTED) for j in idxs}
            if name == "resnext":
                # The oracle also couples position j across conv groups (see Tracker.conv).
                assert theirs <= by_class[c], (names[id(mod)], i)
            else:
                assert theirs == by_class[c], (names[id(mod)], i, theirs ^ by_class[c])
            checked += 1
    assert checked > 0


def test_check_accepts_the_oracle_and_rejects_no_pruning(exported):
    """Controls for check_pruned: the narrow export itself passes, the unpruned wide one fails."""
    wide, narrow = exported("inception", "bn")
    check_pruned(wide, narrow, narrow, 16)
    with pytest.raises(AssertionError, match="too few channels removed"):
        check_pruned(wide, narrow, wide, 16)


def test_mixing_op_shapes_are_measured(exported):
    """The shapes used by the freeze test are real: three mixing ops, full 16 channels each."""
    wide, narrow = exported("traps", "folded")
    x = inputs(zoo.ZOO["traps"].hw)
    shapes = _shapes_into(wide, MIXING, x)
    assert shapes == [(16, 16, 16)] * 3
    assert _shapes_into(narrow, MIXING, x) == shapes   # the oracle froze them


def test_shuffle_oracle_prunes_through_the_permutation(oracle, exported):
    """ShuffleNet's oracle removes channels on both sides of the shuffles (equal halves)."""
    o = oracle("shufflenet_v2")
    assert all(g["removed"] == g["n"] // 2 for g in o.groups if not g["frozen"])
    wide, narrow = exported("shufflenet_v2", "folded")
    x = inputs(16)
    before, after = _shapes_into(wide, {"Transpose"}, x), _shapes_into(narrow, {"Transpose"}, x)
    assert before == [(2, 16, 8, 8)] * 2 and after == [(2, 8, 8, 8)] * 2


# -- the pass against the oracle --------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ARCHS)
def test_channels_matches_oracle(name, variant, exported, pruned):
    wide, narrow = exported(name, variant)
    check_pruned(wide, narrow, pruned(name, variant), zoo.ZOO[name].hw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_channel_mixing_ops_only_freeze(variant, exported, pruned):
    """Channel-mixing ops keep all their channels, and the groups between them are still pruned."""
    wide, narrow = exported("traps", variant)
    got = pruned("traps", variant)
    ops = MIXING
    x = model_inputs(wide, zoo.ZOO["traps"].hw)
    before = _shapes_into(wide, ops, x)
    assert before, "test model lost its channel-mixing ops"
    assert _shapes_into(got, ops, x) == before
    assert zoo.rel_err(run_ort(wide, x), run_ort(got, x)) <= PRUNE_TOL
    assert params(got) < params(wide), "groups away from the mixing ops must still be pruned"


def _perturbed(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The model with noise on every weight matrix and kernel, so the oracle's zeroed channels
    carry signal again: pruning them is then lossy, and only the masked original matches."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        v = onnx.numpy_helper.to_array(t)
        if v.dtype == np.float32 and v.ndim >= 2:
            noisy = v + 0.5 * (v.std() or 1.0) * rng.standard_normal(v.shape).astype(np.float32)
            t.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(np.float32), t.name))
    return m


@pytest.mark.parametrize("name", ARCHS)
def test_masked_original_proof_holds_on_every_architecture(name, exported):
    """Channels pruned at ratio 0.5 from every zoo architecture, now lossy: the pass manager's
    masked-original proof must hold (it raises otherwise), and it must have had something to prove."""
    from prunec.passes import PassManager, build_passes

    model = _perturbed(exported(name, "folded")[0])  # no BN: a zeroed BN gamma would keep channels dead
    passes = build_passes(["channels"], {"channels": {"ratio": "0.5", "round": "1"}})
    _, report = PassManager(passes).run(model)
    rec = report.passes[0]
    assert rec.result.details["classes_removed"] > 0
    v = rec.verification
    assert v.proof is not None and v.proof.what == "masked original" and v.proof.max_rel <= v.rtol
    # Not vacuous: the removed channels changed the outputs far beyond the proof's tolerance.
    assert max(d["rel"] for d in report.final_deviation.values()) > 10 * v.rtol


def test_frozen_groups_are_reported_with_reasons(exported):
    """Each group touching a channel-mixing op or a graph output is reported frozen, with why."""
    from prunec.passes import PassManager, build_passes
    wide, _ = exported("traps", "folded")
    passes = build_passes(["channels"], {"channels": {"ratio": "0.5", "round": "1"}})
    _, report = PassManager(passes).run(wide)
    result = report.passes[0].result
    frozen = {g["id"]: g["frozen"] for g in result.details["group_table"] if g["frozen"]}
    # Torch names the producers after the modules: c1 feeds LRN, c3 Softmax, c4 CumSum.
    for module in ("c1", "c3", "c4", "head"):
        assert [gid for gid in frozen if f"/{module}/" in gid], (module, frozen)
    assert all(isinstance(why, str) and why for why in frozen.values())
    assert len(result.skipped) == len(frozen) == 4
    assert result.details["groups_pruned"] == 2          # c2 and c5


@pytest.mark.parametrize("name", ["unet", "yolo", "resnet_bottleneck", "two_outputs"])
def test_graph_outputs_keep_their_shape(name, exported, pruned):
    wide, _ = exported(name, "bn")
    got = pruned(name, "bn")
    shape = lambda m: [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
                       for o in m.graph.output]
    assert shape(got) == shape(wide)
    x = inputs(zoo.ZOO[name].hw, batch=1)
    assert [o.shape for o in run_ort(got, x)] == [o.shape for o in run_ort(wide, x)]


@pytest.mark.parametrize("name,options", [
    *[(n, {"importance": "l2"}) for n in ("resnet_basic", "densenet", "mobilenet_v3", "unet")],
    *[(n, {"global": "true"}) for n in ("resnet_basic", "densenet", "mobilenet_v3", "unet")],
    # Every prunable group of these has a BatchNormalization (DenseNet's on the Concats).
    *[(n, {"importance": "bn-scale"}) for n in ("resnet_basic", "densenet", "unet")],
])
def test_channels_options_reach_the_same_oracle(name, options, exported):
    """L2 and BN |gamma| rank zeroed channels lowest too; global ranking at ratio 0.5 removes
    exactly the zero-score half when every group has an even size, as in the zoo."""
    wide, narrow = exported(name, "bn")
    check_pruned(wide, narrow, prune(wide, **options), zoo.ZOO[name].hw)


@pytest.mark.parametrize("options", [{"min": "12"}, {"ratio": "0.25"}, {"ratio": "0"},
                                     {"round": "8"}], ids=["min12", "ratio0.25", "ratio0", "round8"])
def test_channels_options_that_remove_less_stay_exact(options, exported):
    """Removing fewer channels than the oracle zeroed (min, smaller ratio, rounding the kept
    4 and 12 up to 8 and 16) picks among the zeroed ones: outputs stay exact, params land
    between narrow and wide."""
    wide, narrow = exported("mobilenet_v2", "bn")
    got = prune(wide, **options)
    onnx.checker.check_model(got, full_check=True)
    x = inputs(16)
    assert zoo.rel_err(run_ort(wide, x), run_ort(got, x)) <= PRUNE_TOL
    assert params(narrow) < params(got) <= params(wide)
    if options.get("ratio") == "0":
        assert params(got) == params(wide)


def test_importance_ignores_bn_running_statistics(oracle):
    """Running mean/var are statistics, not weights: a zeroed channel with a large running
    variance (common after unnormalized inputs) must still score 0 and be removed."""
    o = oracle("resnet_basic")
    wide, narrow = zoo.copy.deepcopy(o.wide), zoo.copy.deepcopy(o.narrow)
    for m in (*wide.modules(), *narrow.modules()):
        if isinstance(m, zoo.nn.BatchNorm2d):
            m.running_var.mul_(100.0)
            m.running_mean.mul_(30.0)
    x = inputs(16)
    assert zoo.rel_err(zoo.torch_outputs(wide, x), zoo.torch_outputs(narrow, x)) <= SELF_TOL
    w, n = zoo.export(wide, 16, keep_bn=True), zoo.export(narrow, 16, keep_bn=True)
    check_pruned(w, n, prune(w), 16)


def test_protect_everything_removes_nothing(exported):
    wide, _ = exported("inception", "bn")
    got = prune(wide, protect=".*")
    assert params(got) == params(wide)
    x = inputs(16)
    assert zoo.rel_err(run_ort(wide, x), run_ort(got, x)) <= 1e-6


# -- property test: random compositions of supported blocks --------------------------------------

# No shrinking: each example is an export and a prune, and a failing run would otherwise spend
# minutes shrinking; the generated example is small enough to read.
@settings(max_examples=10, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(st.sampled_from(sorted(zoo.BLOCKS)), min_size=2, max_size=4),
       width=st.sampled_from([8, 16]), keep_bn=st.booleans(), seed=st.integers(0, 2**16))
def test_channels_random_compositions(blocks, width, keep_bn, seed):
    zoo.torch.manual_seed(seed)
    model = zoo.randomize(zoo.composed(blocks, width), seed)
    o = zoo.make_oracle(model, 3, seed)
    x = inputs(8, seed=seed)
    assert zoo.rel_err(zoo.torch_outputs(o.wide, x), zoo.torch_outputs(o.narrow, x)) <= SELF_TOL
    wide = zoo.export(o.wide, 8, keep_bn=keep_bn)
    narrow = zoo.export(o.narrow, 8, keep_bn=keep_bn)
    check_pruned(wide, narrow, prune(wide), 8)
