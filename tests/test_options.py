"""Pass options: -O parsing, type coercion from the dataclass, unknown names, recipes, precedence."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from models import conv_relu_model, files_in
from prunec.errors import OptionError
from prunec.passes import build_passes, load_recipe
from prunec.passes.base import Pass, make_options, option, option_infos, parse_option_flags


class Knobs(Pass):
    """Not registered: exists only to exercise every option type."""

    name = "knobs"
    summary = "test"

    @dataclass
    class Options:
        flag: bool = option(False, "a bool")
        count: int = option(3, "an int")
        ratio: float = option(0.5, "a float")
        mode: Literal["fast", "safe"] = option("safe", "a literal")
        limit: Optional[int] = option(None, "an optional int")
        label: str = option("x", "a string")
        where: Path = option(Path("."), "a path")
        sizes: list[int] = option([1, 2], "a list of ints")
        block: Literal[2, 4] = option(4, "a literal of ints")

        def validate(self) -> None:
            if not 0 <= self.ratio <= 1:
                raise OptionError(f"knobs.ratio must be in [0, 1], got {self.ratio}")


def test_parse_option_flags():
    assert parse_option_flags(["a.x=1", "a.y = 2", "b-c.key=v=w", "a.x=3"]) == \
        {"a": {"x": "3", "y": "2"}, "b-c": {"key": "v=w"}}
    assert parse_option_flags([]) == {}


@pytest.mark.parametrize("bad", ["novalue", "pass.key", "key=1", ".key=1", "pass.=1"])
def test_parse_option_flags_errors(bad):
    with pytest.raises(OptionError, match="expected pass.key=value"):
        parse_option_flags([bad])


@pytest.mark.parametrize("raw,want", [("true", True), ("1", True), ("Yes", True), ("on", True),
                                      ("false", False), ("0", False), ("NO", False), (True, True)])
def test_bool(raw, want):
    assert make_options(Knobs, {"flag": raw}).flag is want


def test_defaults_and_independent_mutable_defaults():
    a, b = make_options(Knobs, {}), make_options(Knobs, {})
    assert (a.flag, a.count, a.ratio, a.mode, a.limit, a.sizes) == (False, 3, 0.5, "safe", None, [1, 2])
    a.sizes.append(9)
    assert b.sizes == [1, 2]


def test_coercion_of_every_type():
    o = make_options(Knobs, {"count": "7", "ratio": "0.25", "mode": "fast", "limit": "12",
                             "label": 5, "where": "a/b", "sizes": "4,5,6"})
    assert (o.count, o.ratio, o.mode, o.limit, o.label, o.where, o.sizes) == \
        (7, 0.25, "fast", 12, "5", Path("a/b"), [4, 5, 6])
    assert isinstance(o.count, int) and isinstance(o.ratio, float)
    assert make_options(Knobs, {"limit": "none"}).limit is None
    assert make_options(Knobs, {"count": 4.0}).count == 4  # TOML may give 4.0
    assert make_options(Knobs, {"ratio": 1}).ratio == 1.0
    assert make_options(Knobs, {"sizes": [7]}).sizes == [7]
    assert make_options(Knobs, {"block": "2"}).block == 2  # from -O: a string
    assert make_options(Knobs, {"block": 2}).block == 2  # from a recipe: an int


def test_dashes_and_underscores_name_the_same_option():
    class Dashed(Pass):
        name = "dashed"
        summary = "test"
        Options = _Dashed

    assert make_options(Dashed, {"fold-size": "3"}).fold_size == 3
    assert make_options(Dashed, {"fold_size": "4"}).fold_size == 4


@dataclass
class _Dashed:
    fold_size: int = option(1, "dashes on the command line")


@pytest.mark.parametrize("key,raw,msg", [
    ("flag", "maybe", "knobs.flag: expected true or false, got 'maybe'"),
    ("count", "2.5", "knobs.count: expected an integer, got '2.5'"),
    ("count", 2.5, "knobs.count: expected an integer"),
    ("count", True, "knobs.count: expected an integer"),
    ("ratio", "half", "knobs.ratio: expected a number, got 'half'"),
    ("mode", "turbo", "knobs.mode: 'turbo' is not one of fast, safe"),
    ("block", "3", "knobs.block: '3' is not one of 2, 4"),
    ("limit", "lots", "knobs.limit: expected an integer, got 'lots'"),
    ("sizes", "1,x", "knobs.sizes: expected an integer, got 'x'"),
    ("ratio", "2", "knobs.ratio must be in [0, 1], got 2.0"),
])
def test_bad_values(key, raw, msg):
    with pytest.raises(OptionError) as e:
        make_options(Knobs, {key: raw})
    assert msg in str(e.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(OptionError) as e:
        make_options(Knobs, {"colour": "red"})
    assert str(e.value) == ("unknown option knobs.colour; valid options of knobs: flag, count, ratio, "
                            "mode, limit, label, where, sizes, block")


def test_option_infos_describe_types():
    infos = {i.name: i for i in option_infos(Knobs.Options)}
    assert infos["mode"].type_name == "fast|safe"
    assert infos["limit"].type_name == "int?"
    assert infos["sizes"].default == [1, 2]
    assert infos["flag"].help == "a bool"


def test_unknown_pass_lists_valid_ones():
    with pytest.raises(OptionError) as e:
        build_passes(["fold-bn", "nope"], {})
    assert "unknown pass 'nope'" in str(e.value)
    assert "cleanup" in str(e.value) and "fold-bn" in str(e.value)


def test_options_for_pass_not_chosen():
    with pytest.raises(OptionError, match="not being run: fold-bn"):
        build_passes(["cleanup"], {"fold-bn": {}})


# --- through the CLI -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    import onnx

    p = tmp_path_factory.mktemp("opts") / "m.onnx"
    onnx.save(conv_relu_model(), str(p))
    return p


def _run_fails(prunec_cli, tmp_path, model_file, *args) -> str:
    res = prunec_cli("run", model_file, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", *args)
    assert res.exit_code == 2, res.output
    assert files_in(tmp_path) == set()
    return prunec_cli.one_line_error(res)


def test_cli_unknown_pass(prunec_cli, tmp_path, model_file):
    line = _run_fails(prunec_cli, tmp_path, model_file, "--passes", "cleanup,shrink")
    assert "unknown pass 'shrink'; valid passes: " in line and "cleanup" in line and "fold-bn" in line


def test_cli_unknown_option(prunec_cli, tmp_path, model_file):
    line = _run_fails(prunec_cli, tmp_path, model_file, "--passes", "cleanup", "-O", "cleanup.speed=9")
    assert line.endswith("unknown option cleanup.speed; valid options of cleanup: fold-constants, "
                         "fold-size-limit, remove-identity")


@pytest.mark.parametrize("args,msg", [
    (["--passes", "cleanup", "-O", "cleanup.fold-constants=perhaps"], "expected true or false"),
    (["--passes", "cleanup", "-O", "cleanup.fold-size-limit=big"], "expected an integer"),
    (["--passes", "cleanup", "-O", "cleanupfold=1"], "expected pass.key=value"),
    (["--passes", "cleanup", "-O", "fold-bn.x=1"], "not being run"),
    (["--passes", " , "], "--passes is empty"),
    ([], "no passes given"),
])
def test_cli_option_errors(prunec_cli, tmp_path, model_file, args, msg):
    assert msg in _run_fails(prunec_cli, tmp_path, model_file, *args)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_recipe_loading(tmp_path):
    r = _write(tmp_path / "r.toml", 'passes = ["fold-bn", "cleanup"]\n[cleanup]\nfold-size-limit = 1024\n'
                                    'remove-identity = false\n')
    names, opts = load_recipe(r)
    assert names == ["fold-bn", "cleanup"]
    assert opts == {"cleanup": {"fold-size-limit": 1024, "remove-identity": False}}
    passes = build_passes(names, opts)
    assert passes[1].options.fold_size_limit == 1024 and passes[1].options.remove_identity is False


@pytest.mark.parametrize("text,msg", [
    (None, "no such file"),
    ("passes = [fold-bn", "not valid TOML"),
    ("[cleanup]\nfold-constants = true\n", "needs passes = "),
    ('passes = "cleanup"\n', "needs passes = "),
    ('passes = ["cleanup"]\nratio = 0.5\n', "top-level key 'ratio' must be a table"),
])
def test_recipe_errors(tmp_path, text, msg):
    p = tmp_path / "r.toml"
    if text is not None:
        p.write_text(text)
    with pytest.raises(OptionError, match=msg):
        load_recipe(p)


def test_cli_recipe_errors(prunec_cli, tmp_path, model_file):
    recipes = tmp_path.parent / f"{tmp_path.name}-recipes"
    recipes.mkdir()
    bad = _write(recipes / "bad.toml", 'passes = ["cleanup"]\n[cleanup]\nfold-size-limit = "big"\n')
    assert "expected an integer" in _run_fails(prunec_cli, tmp_path, model_file, "--recipe", bad)
    unknown = _write(recipes / "unknown.toml", 'passes = ["cleanup"]\n[cleanup]\nfold = 1\n')
    assert "valid options of cleanup" in _run_fails(prunec_cli, tmp_path, model_file, "--recipe", unknown)
    assert "no such file" in _run_fails(prunec_cli, tmp_path, model_file, "--recipe", recipes / "none.toml")


def test_cli_O_overrides_recipe(prunec_cli, tmp_path, model_file):
    recipe = _write(tmp_path / "r.toml", 'passes = ["fold-bn", "cleanup"]\n'
                                         '[cleanup]\nfold-size-limit = 1024\nremove-identity = false\n')
    report = tmp_path / "report.json"
    res = prunec_cli("run", model_file, "--recipe", recipe, "-O", "cleanup.fold-size-limit=2048",
                     "-o", tmp_path / "o.onnx", "--report", report)
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert doc["passes_requested"] == ["fold-bn", "cleanup"]
    opts = doc["passes"][1]["options"]
    assert opts["fold_size_limit"] == 2048  # -O wins
    assert opts["remove_identity"] is False  # recipe kept where -O says nothing
    # --passes replaces the recipe's list but keeps its options
    res = prunec_cli("run", model_file, "--recipe", recipe, "--passes", "cleanup",
                     "-o", tmp_path / "o2.onnx", "--report", report)
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert [p["name"] for p in doc["passes"]] == ["cleanup"]
    assert doc["passes"][0]["options"]["fold_size_limit"] == 1024


def test_passes_listing_is_readable_in_a_log(prunec_cli):
    # Piped (no terminal), prunec's console never wraps; the option help lines must still end at
    # their text, not run to the console's full width in spaces.
    res = prunec_cli("passes")
    assert res.exit_code == 0, res.output
    assert "-O channels.protect-early" in res.output
    assert max(len(line) for line in res.output.splitlines()) < 1000
