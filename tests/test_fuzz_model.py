"""Byte-level mutations of the demo model (issue 13): whatever the bytes, `prunec run` ends with
exit 0 and a model that loads, or a one-line error and no output file; never a traceback or a hang."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import DEMO, files_in
from prunec.cli.main import cli

RAW = DEMO.read_bytes()
_MODEL = onnx.load(str(DEMO))


def _positions() -> dict[str, list[int]]:
    """Byte offsets by region: text (names, op types: a same-length change keeps the file
    parseable and reaches the checker and the passes), weights (a valid model with other
    numbers reaches verification), and the rest of the structure (dims, attributes, opsets)."""
    weights = np.zeros(len(RAW), bool)
    for t in _MODEL.graph.initializer:
        if len(t.raw_data) > 64:
            start = RAW.find(t.raw_data)
            weights[start:start + len(t.raw_data)] = True
    text = np.zeros(len(RAW), bool)
    g = _MODEL.graph
    strings = {s for n in g.node for s in (n.name, n.op_type, *n.input, *n.output)} | \
        {v.name for v in (*g.input, *g.output, *g.initializer)}
    for s in filter(None, strings):
        b, at = s.encode(), RAW.find(s.encode())
        while at >= 0:
            text[at:at + len(b)] = True
            at = RAW.find(b, at + 1)
    return {"text": np.flatnonzero(text).tolist(), "weights": np.flatnonzero(weights).tolist(),
            "structure": np.flatnonzero(~weights & ~text).tolist()}


POSITIONS = _positions()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(RAW)
    for _ in range(draw(st.integers(1, 2))):
        region = draw(st.sampled_from(["text", "weights", "text", "weights", "structure", "anywhere"]))
        if region == "anywhere" or len(data) != len(RAW):
            if not data:
                break
            pos = draw(st.integers(0, len(data) - 1))
        else:
            pos = draw(st.sampled_from(POSITIONS[region]))
        kind = draw(st.sampled_from(["byte", "flip"] if region in ("text", "weights") else
                                    ["byte", "flip", "insert", "delete", "truncate"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[pos] = draw(st.sampled_from([0xFF, 0xC3, 0x00, 0x7F, 0x2F, 0x41, 0x80, 0x01]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


@contextmanager
def time_limit(seconds: int):
    """A hang fails the example (SIGALRM), instead of hanging the suite."""
    def hang(signum, frame):
        raise TimeoutError(f"prunec run took more than {seconds} s on a mutated model")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=mutated())
def test_mutated_model_never_crashes(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzz")
    src, out = d / "m.onnx", d / "out" / "o.onnx"
    src.write_bytes(data)
    out.parent.mkdir()
    with time_limit(120):
        res = CliRunner().invoke(cli, ["run", str(src), "--passes", "fold-bn,cleanup,channels",
                                       "-O", "channels.ratio=0.3", "-o", str(out), "--no-profile"],
                                 catch_exceptions=False)
    if res.exit_code == 0:
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        assert files_in(out.parent) == {"o.onnx"}
    else:
        assert res.exit_code in (2, 4), res.output
        err = res.stderr.strip()
        assert err.startswith("prunec: error: ") and "\n" not in err, err
        assert files_in(out.parent) == set()
