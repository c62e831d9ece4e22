"""SIGINT, SIGTERM and SIGHUP sent to a real `prunec run` process (issue 13): temp files
removed, exit 130/143/129, one line on stderr, no traceback; an output file only when complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from models import REPO, files_in, init, make_model, vi

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def start(args, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "prunec", *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=60.0, step=0.0005) -> bool:
    """Poll until `predicate()` holds (True) or the process ends / time runs out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(step)
    return False


def imports_started(proc) -> bool:
    """numpy is only imported by prunec's commands, after the signal handlers are installed."""
    try:
        return "numpy" in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


def check_clean_exit(proc, sig, tmp_path, out: Path):
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    if proc.returncode == 0:  # finished before the signal landed: the output must be complete
        onnx.checker.check_model(onnx.load(str(out)))
        return False
    assert proc.returncode == EXIT[sig], (proc.returncode, err)
    assert err.strip().splitlines()[-1] == \
        f"prunec: interrupted ({sig.name}); temp files removed, the run did not finish", err
    assert not [f for f in files_in(tmp_path) if f.endswith(".tmp")], files_in(tmp_path)
    assert not out.exists()
    return True


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the child's imports")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_in_the_first_second(tmp_path, demo_path, sig):
    """While the commands are still being imported (the first second of a run)."""
    out = tmp_path / "out.onnx"
    proc = start(["run", demo_path, "--passes", "fold-bn,cleanup,channels", "-o", out], tmp_path)
    assert wait_for(lambda: imports_started(proc), proc), "the child never started importing"
    proc.send_signal(sig)
    assert check_clean_exit(proc, sig, tmp_path, out)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """x[N,256] @ W[256,32768] (32 MiB of weights): writing it takes long enough to be hit."""
    w = np.random.default_rng(0).standard_normal((256, 32768)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Identity", ["h"], ["y"])],
                   [vi("x", ["N", 256])], [vi("y", ["N", 32768])], [init("w", w)])
    p = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(m, str(p))
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_the_write_removes_the_temp_file(tmp_path, big_model, sig):
    """The signal is sent the moment the hidden temp file appears beside the output."""
    out = tmp_path / "out.onnx"
    for _ in range(3):  # a write can finish before the signal lands; try again then
        proc = start(["run", big_model, "--passes", "cleanup", "-o", out, "--no-profile"], tmp_path)
        seen = wait_for(lambda: any(n.startswith(".out.onnx.") for n in os.listdir(tmp_path)), proc)
        proc.send_signal(sig)
        if check_clean_exit(proc, sig, tmp_path, out) and seen:
            return
        out.unlink(missing_ok=True)
    pytest.fail("the signal never landed during the write in 3 tries")


def test_nohup_keeps_sighup_ignored(tmp_path, demo_path):
    """A signal ignored by whoever started prunec (nohup) stays ignored."""
    out = tmp_path / "out.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "prunec", "run", str(demo_path), "--passes", "fold-bn",
                             "-o", str(out), "--no-profile"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert wait_for(lambda: imports_started(proc), proc)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    onnx.checker.check_model(onnx.load(str(out)))
