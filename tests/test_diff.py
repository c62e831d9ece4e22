"""`prunec diff`: node matching, per-layer numbers, breaking-change flags, renderers, CLI, run hooks.

Every expected number is computed by hand from the model's definition below, not read back
from prunec.graph.costs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from prunec.cli.main import cli
from prunec.graph.diff import SCHEMA_VERSION, diff_models
from prunec.graph.ir import from_onnx, normalize, to_onnx
from prunec.graph.match import match_nodes
from prunec.report.diff import render_html, render_json, render_text

# x[1,3,8,8] -> conv1(3->8, 3x3, pad 1) -> relu1 -> conv2(8->4, 3x3, pad 1) -> relu2
#            -> gap -> flatten -> fc (Gemm 4->10, transB=1) -> out[1,10]
C_IN, C1, C2, HW, CLASSES = 3, 8, 4, 8, 10
NODES = ["conv1", "relu1", "conv2", "relu2", "gap", "flatten", "fc"]
KEEP = [0, 2, 4, 6]  # conv1 output channels the hand-made "pruning pass" keeps


def build(w1, b1, w2, b2, wf, bf, *, names: dict[str, str] | None = None, alpha: float | None = None
          ) -> onnx.ModelProto:
    """The test model; `names` renames nodes, intermediate tensors and initializers."""
    nm = (lambda k: (names or {}).get(k, k))
    inits = [numpy_helper.from_array(a, nm(k)) for k, a in
             (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("wf", wf), ("bf", bf))]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    gemm = dict(transB=1, **({"alpha": alpha} if alpha is not None else {}))
    nodes = [
        helper.make_node("Conv", ["x", nm("w1"), nm("b1")], [nm("t1")], nm("conv1"), **conv),
        helper.make_node("Relu", [nm("t1")], [nm("t2")], nm("relu1")),
        helper.make_node("Conv", [nm("t2"), nm("w2"), nm("b2")], [nm("t3")], nm("conv2"), **conv),
        helper.make_node("Relu", [nm("t3")], [nm("t4")], nm("relu2")),
        helper.make_node("GlobalAveragePool", [nm("t4")], [nm("t5")], nm("gap")),
        helper.make_node("Flatten", [nm("t5")], [nm("t6")], nm("flatten")),
        helper.make_node("Gemm", [nm("t6"), nm("wf"), nm("bf")], ["out"], nm("fc"), **gemm),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, HW, HW])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, wf.shape[0]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


@pytest.fixture(scope="session")
def weights():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(w1=f(C1, C_IN, 3, 3), b1=f(C1), w2=f(C2, C1, 3, 3), b2=f(C2), wf=f(CLASSES, C2),
                bf=f(CLASSES))


@pytest.fixture(scope="session")
def base(weights):
    return build(**weights)


def pruned_weights(weights):
    w = dict(weights)
    w["w1"], w["b1"] = w["w1"][KEEP], w["b1"][KEEP]
    w["w2"] = np.ascontiguousarray(w["w2"][:, KEEP])
    return w


@pytest.fixture(scope="session")
def pruned(weights):
    return build(**pruned_weights(weights))


RENAME = {k: f"{k}__r" for k in NODES + ["t1", "t2", "t3", "t4", "t5", "t6", "w1", "b1", "w2", "b2", "wf", "bf"]}

# Hand-computed costs. Conv params = out*in*k*k + out; MACs = out elements * in*k*k.
CONV1 = dict(params=(C1 * C_IN * 9 + C1, len(KEEP) * C_IN * 9 + len(KEEP)),
             macs=(C1 * HW * HW * C_IN * 9, len(KEEP) * HW * HW * C_IN * 9))
CONV2 = dict(params=(C2 * C1 * 9 + C2, C2 * len(KEEP) * 9 + C2),
             macs=(C2 * HW * HW * C1 * 9, C2 * HW * HW * len(KEEP) * 9))
FC = dict(params=CLASSES * C2 + CLASSES, macs=CLASSES * C2)


def by_name(d):
    return {n.name: n for n in d.nodes}


# -- analysis ---------------------------------------------------------------------------------


def test_identity_diff_is_empty(base):
    d = diff_models(base, copy(base))
    assert d.empty and not d.changed_nodes and not d.warnings and not d.breaking
    assert d.counts() == {"unchanged": 7, "changed": 0, "removed": 0, "added": 0}
    assert d.matched_by == {"name": 7, "topology": 0, "order": 0}
    assert all(i.status == "unchanged" for i in d.initializers)
    assert "no differences" in render_text(d)


def test_graphsurgeon_round_trip_is_empty(base):
    g = from_onnx(base)
    normalize(g)
    d = diff_models(base, to_onnx(g, base))
    assert d.empty, [n.to_dict() for n in d.changed_nodes]


def test_pruned_channels_show_exactly_those_layers(base, pruned):
    d = diff_models(base, pruned)
    changed = {n.name: n for n in d.changed_nodes}
    # relu1 carries the pruned tensor: its shapes change, not its costs.
    assert list(changed) == ["conv1", "relu1", "conv2"]
    c1, r1, c2 = changed["conv1"], changed["relu1"], changed["conv2"]
    assert tuple(c1.params) == CONV1["params"] and tuple(c1.macs) == CONV1["macs"]
    assert tuple(c2.params) == CONV2["params"] and tuple(c2.macs) == CONV2["macs"]
    assert c1.channels == {"out": [C1, len(KEEP)]}
    assert c2.channels == {"in": [C1, len(KEEP)]}
    assert r1.params == [0, 0] and r1.output_shape == [[1, C1, HW, HW], [1, len(KEEP), HW, HW]]
    assert {(w.slot, w.before.name) for w in c1.weights} == {(1, "w1"), (2, "b1")}
    assert c2.weights[0].before.shape == [C2, C1, 3, 3] and c2.weights[0].after.shape == [C2, 4, 3, 3]
    assert not c1.attributes and not c2.attributes
    assert d.counts() == {"unchanged": 4, "changed": 3, "removed": 0, "added": 0}
    assert d.totals["params"] == [CONV1["params"][0] + CONV2["params"][0] + FC["params"],
                                  CONV1["params"][1] + CONV2["params"][1] + FC["params"]]
    assert d.totals["macs"] == [CONV1["macs"][0] + CONV2["macs"][0] + FC["macs"],
                                CONV1["macs"][1] + CONV2["macs"][1] + FC["macs"]]
    assert {i.name: i.changes for i in d.initializers if i.status != "unchanged"} == \
        {"w1": ["shape"], "b1": ["shape"], "w2": ["shape"]}
    assert not d.breaking and not d.warnings
    text = render_text(d)
    assert "8→4 out" in text and "8→4 in" in text and "8→4 ch" in text
    assert "relu2" not in text  # only changed layers in the terminal table


def test_renamed_nodes_still_match(base, weights):
    renamed = build(**weights, names=RENAME)
    d = diff_models(base, renamed)
    assert d.matched_by == {"name": 0, "topology": 7, "order": 0}
    assert d.empty and not d.changed_nodes
    assert all(n.renamed for n in d.nodes)
    # Renamed initializers pair through the node slots they occupy: nothing added or removed.
    assert all(i.status == "unchanged" for i in d.initializers)


def test_renamed_and_pruned(base, weights):
    d = diff_models(base, build(**pruned_weights(weights), names=RENAME))
    assert [n.name for n in d.changed_nodes] == ["conv1__r", "relu1__r", "conv2__r"]
    c2 = d.changed_nodes[2]
    assert c2.before.name == "conv2" and tuple(c2.macs) == CONV2["macs"]


def test_renamed_graph_input_matches_by_position_and_is_breaking(base, weights):
    m = build(**weights, names=RENAME)
    m.graph.input[0].name = "x_r"
    m.graph.node[0].input[0] = "x_r"
    d = diff_models(base, m)
    assert d.matched_by == {"name": 0, "topology": 7, "order": 0} and not d.changed_nodes
    # Callers feeding "x" break.
    assert d.breaking and d.warnings == ["BREAKING: input 'x' renamed 'x' → 'x_r': callers must feed it differently"]


def _chain(ops: list[str], prefix: str) -> onnx.ModelProto:
    names = [f"{prefix}{i}" for i in range(len(ops))]
    tensors = ["x"] + [f"{prefix}t{i}" for i in range(len(ops) - 1)] + ["y"]
    nodes = [helper.make_node(op, [tensors[i]], [tensors[i + 1]], names[i]) for i, op in enumerate(ops)]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])  # noqa: E731
    return helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("y")]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_order_fallback_when_topology_has_no_anchor():
    # Both ends change op type and everything is renamed: Relu and Sigmoid touch no matched
    # node, so only graph order can pair them.
    before = _chain(["Identity", "Relu", "Sigmoid", "Identity"], "a")
    after = _chain(["Neg", "Relu", "Sigmoid", "Neg"], "b")
    d = diff_models(before, after)
    assert d.matched_by == {"name": 0, "topology": 0, "order": 2}
    assert [(n.name, n.status, n.match) for n in d.nodes] == [
        ("a0", "removed", None), ("b0", "added", None), ("b1", "unchanged", "order"),
        ("b2", "unchanged", "order"), ("a3", "removed", None), ("b3", "added", None)]


def test_symmetric_branches_are_not_guessed_by_topology():
    # x -> Relu -> Add <- Relu <- x: the two Relus differ only by the Add slot they feed.
    def model(p):
        vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])  # noqa: E731
        nodes = [helper.make_node("Relu", ["x"], [f"{p}l"], f"{p}left"),
                 helper.make_node("Relu", ["x"], [f"{p}r"], f"{p}right"),
                 helper.make_node("Sub", [f"{p}l", f"{p}r"], ["y"], f"{p}sub")]
        return helper.make_model(helper.make_graph(nodes, "g", [vi("x")], [vi("y")]),
                                 opset_imports=[helper.make_opsetid("", 17)])
    before, after = model("a_"), model("b_")
    after.graph.node[0].input[0], after.graph.node[1].input[0] = "x", "x"
    # Swap the order of the two Relus in the after graph: order would pair them wrongly,
    # topology (Sub's input slots) pairs them right.
    after.graph.node[0].CopyFrom(model("b_").graph.node[1])
    after.graph.node[1].CopyFrom(model("b_").graph.node[0])
    d = diff_models(before, after)
    pairs = {n.before.name: n.after.name for n in d.nodes if n.before and n.after}
    assert pairs == {"a_left": "b_left", "a_right": "b_right", "a_sub": "b_sub"}
    assert d.matched_by["topology"] == 3


def test_output_shape_change_is_flagged(base, weights):
    w = dict(weights)
    w["wf"], w["bf"] = w["wf"][:5], w["bf"][:5]
    d = diff_models(base, build(**w))
    assert d.breaking
    out = next(x for x in d.io if x.kind == "output")
    assert out.breaking and out.inferred_shape == [[1, 10], [1, 5]] and "shape" in out.changes
    assert any(msg.startswith("BREAKING") and "1x10 → 1x5" in msg for msg in d.warnings)
    fc = by_name(d)["fc"]
    assert fc.channels == {"out": [10, 5]} and fc.params == [50, 25]
    assert "BREAKING" in render_text(d)
    assert render_json(d).count('"breaking": true') >= 2  # summary and the output entry


def test_fail_on_breaking_exits_5_only_when_the_interface_broke(base, weights, tmp_path):
    w = dict(weights)
    w["wf"], w["bf"] = w["wf"][:5], w["bf"][:5]
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(base, a)
    onnx.save(build(**w), b)
    r = CliRunner().invoke(cli, ["diff", str(a), str(b), "--fail-on-breaking"])
    assert r.exit_code == 5 and "breaking interface change" in r.output and "output" in r.output
    assert CliRunner().invoke(cli, ["diff", str(a), str(b)]).exit_code == 0
    assert CliRunner().invoke(cli, ["diff", str(a), str(a), "--fail-on-breaking"]).exit_code == 0


def test_output_dtype_change_is_flagged(base):
    m = copy(base)
    m.graph.node.append(helper.make_node("Cast", ["out16"], ["out"], "cast", to=TensorProto.FLOAT16))
    m.graph.node[6].output[0] = "out16"
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    d = diff_models(base, m)
    out = next(x for x in d.io if x.kind == "output")
    assert out.breaking and "dtype" in out.changes
    assert [n.name for n in d.nodes if n.status == "added"] == ["cast"]


def test_removed_and_added_nodes(base):
    m = copy(base)
    relu1 = m.graph.node[1]
    m.graph.node[2].input[0] = "t1"
    m.graph.node.remove(relu1)
    # A new node between gap and flatten.
    m.graph.node.insert(4, helper.make_node("Identity", ["t5"], ["t5b"], "ident"))
    m.graph.node[5].input[0] = "t5b"
    d = diff_models(base, m)
    status = {n.name: n.status for n in d.nodes}
    assert status == {"conv1": "unchanged", "relu1": "removed", "conv2": "unchanged",
                      "relu2": "unchanged", "gap": "unchanged", "ident": "added",
                      "flatten": "unchanged", "fc": "unchanged"}
    assert [n.name for n in d.nodes] == ["conv1", "relu1", "conv2", "relu2", "gap", "ident", "flatten", "fc"]
    assert d.totals["nodes"] == [7, 7] and not d.breaking


def test_attribute_change(base, weights):
    d = diff_models(base, build(**weights, alpha=2.0))
    fc = by_name(d)["fc"]
    assert fc.status == "changed" and fc.attributes == {"alpha": [None, 2.0]}
    assert fc.params == [FC["params"]] * 2 and fc.macs == [FC["macs"]] * 2


def test_constant_tensor_attribute_change():
    def model(shape):
        vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
        nodes = [helper.make_node("Constant", [], ["shape"], "shape_const",
                                  value=numpy_helper.from_array(np.array(shape, np.int64))),
                 helper.make_node("Reshape", ["x", "shape"], ["y"], "reshape")]
        return helper.make_model(helper.make_graph(nodes, "g", [vi("x", [2, 6])], [vi("y", None)]),
                                 opset_imports=[helper.make_opsetid("", 17)])
    d = diff_models(model([2, 3, 2]), model([2, 6]))
    const = by_name(d)["shape_const"]
    assert const.attributes == {"value": [{"tensor": {"shape": [3], "dtype": "int64", "values": [2, 3, 2]}},
                                          {"tensor": {"shape": [2], "dtype": "int64", "values": [2, 6]}}]}
    assert by_name(d)["reshape"].outputs[0].after.shape == [2, 6]
    out = next(x for x in d.io if x.kind == "output")
    assert out.breaking and out.inferred_shape == [[2, 3, 2], [2, 6]]
    json.loads(render_json(d))


def test_sparsity_values_and_storage(base, weights):
    w = dict(weights)
    w2 = w["w2"].copy()
    w2[:, ::2] = 0  # half of conv2's input channels zeroed: sparsity 0.5, same shape
    w["w2"] = w2
    m = build(**w)
    # Move bf to sparse storage (same values).
    bf = next(t for t in m.graph.initializer if t.name == "bf")
    arr = numpy_helper.to_array(bf)
    m.graph.initializer.remove(bf)
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(arr, "bf"), numpy_helper.from_array(np.arange(CLASSES, dtype=np.int64)),
        [CLASSES]))
    d = diff_models(base, m)
    inits = {i.name: i for i in d.initializers}
    assert inits["w2"].changes == ["sparsity"]
    assert inits["w2"].before.sparsity == 0.0 and inits["w2"].after.sparsity == 0.5
    assert inits["bf"].changes == ["storage"]
    assert (inits["bf"].before.storage, inits["bf"].after.storage) == ("dense", "sparse")
    conv2 = by_name(d)["conv2"]
    assert conv2.changes == ["weight_values"] and conv2.params == [CONV2["params"][0]] * 2
    assert [n.name for n in d.changed_nodes] == ["conv2"]  # sparse bf keeps its values
    assert d.totals["sparse_initializers"] == [0, 1]


def test_input_shapes_are_used(tmp_path):
    # A symbolic batch: MACs scale with the --input-shape given.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], "g",
                                            [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    d = diff_models(m, copy(m), input_shapes={"x": (3, 4)})
    assert d.totals["macs"] == [3 * 4 * 2] * 2 and d.input_shapes[0] == {"x": [3, 4]}


# -- renderers --------------------------------------------------------------------------------


def test_json_is_complete_and_stable(base, pruned):
    d = diff_models(base, pruned)
    text = render_json(d)
    assert text == render_json(diff_models(base, pruned))
    doc = json.loads(text)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["summary"]["matched"] == 7 and doc["summary"]["nodes"]["changed"] == 3
    assert set(doc) >= {"summary", "totals", "input_shapes", "warnings", "io", "nodes", "initializers"}
    assert len(doc["nodes"]) == 7 and len(doc["initializers"]) == 6
    conv1 = doc["nodes"][0]
    assert conv1["name"] == "conv1" and conv1["params"] == list(CONV1["params"])
    assert conv1["channels"] == {"out": [8, 4]} and conv1["match"] == "name"
    only = json.loads(render_json(d, only_changed=True))
    assert [n["name"] for n in only["nodes"]] == ["conv1", "relu1", "conv2"]
    assert only["totals"] == doc["totals"]


class _Doc(HTMLParser):
    VOID = {"meta", "input", "br", "img", "hr", "link", "col", "source", "wbr", "area", "base", "embed",
            "track"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags, self.urls, self.ids = [], [], [], [], set()
        self.decl = None
        self.in_style, self.style = False, ""

    def handle_decl(self, decl):
        self.decl = decl

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for k in ("src", "href", "action", "data", "poster", "srcset"):
            if k in a:
                self.urls.append(a[k])
        if tag not in self.VOID:
            self.stack.append(tag)
        self.in_style = tag == "style"

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()
        self.in_style = False

    def handle_data(self, data):
        if self.in_style:
            self.style += data


def check_self_contained(page: str) -> _Doc:
    p = _Doc()
    p.feed(page)
    p.close()
    assert p.decl and p.decl.lower() == "doctype html"
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert not p.urls, p.urls  # no src/href at all: nothing is fetched
    assert "link" not in p.tags and "iframe" not in p.tags
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "url(" not in p.style and "@import" not in p.style
    return p


def test_html_is_a_valid_self_contained_document(base, pruned, weights):
    d = diff_models(base, pruned)
    page = render_html(d, labels=("a.onnx", "b.onnx"))
    p = check_self_contained(page)
    assert {"summary", "layers", "chart"} <= p.ids
    assert page.count("<tr class=") >= 7  # every layer is in the table
    assert "conv1" in page and "8→4 out" in page
    # Breaking changes show, and names are escaped.
    w = dict(weights)
    w["wf"], w["bf"] = w["wf"][:5], w["bf"][:5]
    evil = build(**w, names={"fc": "<script>alert(1)</script>"})
    page2 = render_html(diff_models(base, evil), only_changed=True)
    check_self_contained(page2)
    assert "BREAKING" in page2 and "<script>alert" not in page2


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_html_opens_in_headless_chromium(base, pruned, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium/Chrome on PATH (chromium, chromium-browser, google-chrome); "
                    "the parser-based HTML test still ran")
    # Drive the page's own JS in the browser: sort by "params before" (ascending), then hide the
    # unchanged layers, and record what the DOM looks like afterwards.
    probe = """<script>
    var th = document.querySelectorAll('#layers th')[5]; th.click();
    var names = Array.prototype.map.call(document.querySelectorAll('#layers tbody tr'),
                                         function (r) { return r.cells[1].textContent; });
    var cb = document.getElementById('show-unchanged'); cb.click();
    document.body.setAttribute('data-order', names.join(','));
    document.body.setAttribute('data-hidden', document.getElementById('layers').className);
    </script></body>"""
    page = tmp_path / "diff.html"
    html_text = render_html(diff_models(base, pruned))
    page.write_text(html_text.replace("</body>", probe), encoding="utf-8")
    run = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    assert 'id="layers"' in dom and 'id="chart"' in dom
    # Zero-param layers first (stable sort keeps graph order), then fc 50, conv1 224, conv2 292.
    assert 'data-order="relu1,relu2,gap,flatten,fc,conv1,conv2"' in dom
    assert 'data-hidden="sortable hide-unchanged"' in dom


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, base, pruned):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(base, a)
    onnx.save(pruned, b)
    return a, b


def test_cli_diff_writes_json_and_html(files, tmp_path):
    a, b = files
    j, h = tmp_path / "d.json", tmp_path / "d.html"
    r = CliRunner().invoke(cli, ["diff", str(a), str(b), "--json", str(j), "--html", str(h), "--only-changed"])
    assert r.exit_code == 0, r.output
    assert "conv1" in r.output and "8→4 out" in r.output
    doc = json.loads(j.read_text())
    assert doc["before"] == str(a) and doc["only_changed"] is True
    assert doc["totals"]["file_bytes"] == [a.stat().st_size, b.stat().st_size]
    assert [n["name"] for n in doc["nodes"]] == ["conv1", "relu1", "conv2"]
    check_self_contained(h.read_text())


@pytest.mark.parametrize("case", ["missing-model", "bad-folder", "bad-shape"])
def test_cli_bad_input_one_line_no_files(files, tmp_path, case):
    a, b = files
    j, h = tmp_path / "d.json", tmp_path / "d.html"
    args = {"missing-model": ["diff", str(a), str(tmp_path / "nope.onnx"), "--json", str(j), "--html", str(h)],
            "bad-folder": ["diff", str(a), str(b), "--json", str(j), "--html", str(tmp_path / "no" / "d.html")],
            "bad-shape": ["diff", str(a), str(b), "--json", str(j), "--input-shape", "y=1x2"]}[case]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunec: error:"), r.output
    assert not j.exists() and not h.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_run_writes_whole_and_per_pass_diffs(tmp_path, base):
    m = copy(base)
    # An Identity for cleanup to remove, so the run changes something visible.
    m.graph.node[5].input[0] = "t5i"
    m.graph.node.insert(5, helper.make_node("Identity", ["t5"], ["t5i"], "ident"))
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    out, whole, each = tmp_path / "o.onnx", tmp_path / "x.html", tmp_path / "per-pass"
    r = CliRunner().invoke(cli, ["run", str(src), "--passes", "fold-bn,cleanup", "-o", str(out),
                                 "--diff", str(whole), "--diff-each", str(each)])
    assert r.exit_code == 0, r.output
    page = whole.read_text()
    check_self_contained(page)
    assert "ident" in page and "removed" in page
    assert sorted(p.name for p in each.iterdir()) == ["01-fold-bn.html", "02-cleanup.html"]
    assert "No differences" in (each / "01-fold-bn.html").read_text()
    assert "ident" in (each / "02-cleanup.html").read_text()
    # The JSON flavour of --diff.
    wj = tmp_path / "x.json"
    r = CliRunner().invoke(cli, ["run", str(src), "--passes", "cleanup", "-o", str(out), "--diff", str(wj)])
    assert r.exit_code == 0, r.output
    doc = json.loads(wj.read_text())
    assert [(n["name"], n["status"]) for n in doc["nodes"] if n["status"] != "unchanged"] == [("ident", "removed")]


def test_run_bad_diff_path_fails_before_work(tmp_path, base):
    src = tmp_path / "m.onnx"
    onnx.save(base, src)
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(cli, ["run", str(src), "--passes", "cleanup", "-o", str(out),
                                 "--diff", str(tmp_path / "missing" / "x.html")])
    assert r.exit_code == 2 and "prunec: error:" in r.output
    assert not out.exists()


def test_run_channels_pass_diff_matches_the_written_model(tmp_path, base):
    # The real pruning pass: every number in the diff must agree with the weights actually
    # written, counted here by hand (Conv: out*in*9 + out params, out*H*W*in*9 MACs).
    src, out, dj = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "d.json"
    onnx.save(base, src)
    r = CliRunner().invoke(cli, ["run", str(src), "--passes", "channels", "-O", "channels.ratio=0.5", "-O", "channels.round=1",
                                 "-o", str(out), "--diff", str(dj)])
    assert r.exit_code == 0, r.output
    doc = json.loads(dj.read_text())
    pruned = onnx.load(str(out))
    w = {t.name: numpy_helper.to_array(t).shape for t in pruned.graph.initializer}
    nodes = {n["name"]: n for n in doc["nodes"]}
    for node in pruned.graph.node:
        if node.op_type != "Conv":
            continue
        o, i = w[node.input[1]][:2]
        entry = nodes[node.name]
        assert entry["params"][1] == o * i * 9 + o
        assert entry["macs"][1] == o * HW * HW * i * 9
    conv1 = nodes["conv1"]
    assert conv1["status"] == "changed" and conv1["channels"]["out"] == [C1, C1 // 2]
    assert nodes["conv2"]["channels"]["in"] == [C1, C1 // 2]
    assert doc["summary"]["breaking"] is False  # channel pruning never touches the outputs
    assert doc["totals"]["params"][1] == sum(int(np.prod(s)) for s in w.values())


# -- property: renaming and reordering never fool the matcher ----------------------------------

_UNARY, _BINARY = ["Relu", "Sigmoid", "Neg", "Abs"], ["Add", "Mul", "Sub"]


@st.composite
def dags(draw):
    """A random DAG of elementwise ops on [2, 3] tensors; every unused tensor is a graph output."""
    n = draw(st.integers(2, 14))
    tensors, specs = ["x0", "x1"], []
    for i in range(n):
        binary = draw(st.booleans())
        op = draw(st.sampled_from(_BINARY if binary else _UNARY))
        ins = [draw(st.sampled_from(tensors)) for _ in range(2 if binary else 1)]
        specs.append((op, ins, f"t{i}"))
        tensors.append(f"t{i}")
    # A random topological order: repeatedly pick any node whose inputs are ready.
    done, perm, pending = {"x0", "x1"}, [], list(range(n))
    while pending:
        avail = [i for i in pending if all(t in done for t in specs[i][1])]
        pick = draw(st.sampled_from(avail))
        pending.remove(pick)
        perm.append(pick)
        done.add(specs[pick][2])
    return specs, perm


def _dag_model(specs, order, prefix: str) -> onnx.ModelProto:
    used = {t for _, ins, _ in specs for t in ins}
    outs = [out for _, _, out in specs if out not in used]
    ren = lambda t: t if t.startswith("x") or t in outs else f"{prefix}{t}"  # noqa: E731
    nodes = [helper.make_node(specs[i][0], [ren(t) for t in specs[i][1]], [ren(specs[i][2])], f"{prefix}n{i}")
             for i in order]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])  # noqa: E731
    return helper.make_model(helper.make_graph(nodes, "g", [vi("x0"), vi("x1")], [vi(o) for o in outs]),
                             opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=60, deadline=None)
@given(dags())
def test_matching_survives_renaming_and_reordering(dag):
    specs, perm = dag
    before = _dag_model(specs, range(len(specs)), "a_")
    after = _dag_model(specs, perm, "b_")
    m = match_nodes(before, after)
    got = {before.graph.node[bi].name[2:]: after.graph.node[ai].name[2:] for bi, (ai, _) in m.pairs.items()}
    assert not m.removed and not m.added
    # Graph inputs and outputs are anchors and every input slot counts, so each node has exactly
    # one right partner (1500 examples checked while writing this test; 60 run here).
    assert all(b == a for b, a in got.items()), got
