"""Shared fixtures: the CLI runner, the demo model and its data, a clean output folder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import DEMO, DEMO_TEST  # noqa: E402

from prunec.cli.main import cli  # noqa: E402


class Cli:
    """Invoke `prunec` in-process; results carry exit_code, stdout and stderr separately."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str):
        return self.runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    @staticmethod
    def one_line_error(result) -> str:
        """The `prunec: error: ...` line; fails the test if stderr is not exactly that one line."""
        err = result.stderr.strip()
        assert err.startswith("prunec: error: "), err
        assert "\n" not in err, err
        assert "Traceback" not in result.output
        return err


@pytest.fixture(autouse=True)
def _no_progress_lines(monkeypatch):
    """Progress lines go to stderr when a command runs longer than PRUNEC_PROGRESS_SECONDS; on a
    loaded machine any command may, and tests that read stderr as one error line would see them.
    Tests of the progress lines set the variable themselves."""
    monkeypatch.setenv("PRUNEC_PROGRESS_SECONDS", "3600")


@pytest.fixture(scope="session")
def prunec_cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def demo_path() -> Path:
    assert DEMO.is_file(), "models/demo_cnn.onnx missing: run python models/make_demo.py"
    return DEMO


@pytest.fixture(scope="session")
def demo_model(demo_path) -> onnx.ModelProto:
    return onnx.load(str(demo_path))


@pytest.fixture(scope="session")
def demo_data() -> dict[str, np.ndarray]:
    with np.load(DEMO_TEST) as d:
        return {k: d[k] for k in d.files}

