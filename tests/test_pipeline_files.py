"""Output files in a build pipeline (issue 13): regular files or new paths only, symlinks kept,
every output path checked before any work, every OS error one line with no temp file left."""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager

import onnx
import pytest

from models import conv_relu_model, files_in
from prunec.errors import ModelSaveError, OutputFileError
from prunec.graph import io
from prunec.graph.io import save_model
from prunec.report.files import write_text_atomic

ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def small_model() -> onnx.ModelProto:
    return conv_relu_model()


def special_files(tmp_path):
    """(label, path) of a FIFO, a socket, and (as root) a character device, all made here."""
    import socket

    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.onnx"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    out = [("a FIFO (named pipe)", fifo), ("a socket", sock_path)]
    if ROOT:
        import stat

        dev = tmp_path / "null.onnx"
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
        out.append(("a character device", dev))
    return out, sock


def test_special_files_are_refused_and_left_alone(prunec_cli, tmp_path, demo_path):
    if not ROOT:
        pytest.skip("os.mknod needs root; the FIFO and socket cases run in the CLI test below")
    specials, sock = special_files(tmp_path)
    try:
        for kind, path in specials:
            before = os.stat(path)
            for flag in ("-o", "--report", "--diff"):
                args = ["run", demo_path, "--passes", "fold-bn", "--no-profile"]
                args += ["-o", path] if flag == "-o" else ["-o", tmp_path / "m.onnx", flag, path]
                res = prunec_cli(*args)
                assert res.exit_code == 2, (kind, flag, res.output)
                assert f"is {kind}, not a regular file" in prunec_cli.one_line_error(res)
            after = os.stat(path)
            assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
        assert not (tmp_path / "m.onnx").exists()
    finally:
        sock.close()


def test_fifo_and_socket_refused_for_every_output_flag(prunec_cli, tmp_path, demo_path):
    """A FIFO or a socket as any output of any command: one line, exit 2, the file untouched."""
    specials, sock = special_files(tmp_path)
    fifo = specials[0][1]
    data = demo_path.parent / "demo_digits_test.npz"
    cases = [
        ["run", demo_path, "--passes", "fold-bn", "-o", fifo],
        ["run", demo_path, "--passes", "fold-bn", "-o", tmp_path / "m.onnx", "--json", fifo],
        ["run", demo_path, "--passes", "fold-bn", "-o", tmp_path / "m.onnx", "--diff", fifo],
        ["run", demo_path, "--passes", "fold-bn", "-o", tmp_path / "m.onnx", "--diff-each", fifo],
        ["diff", demo_path, demo_path, "--html", fifo],
        ["check", demo_path, demo_path, "--data", data, "--json", fifo],
        ["sensitivity", demo_path, "--data", data, "--json", fifo],
        ["sensitivity", demo_path, "--data", data, "--budget", "macs=0.9", "--plan-out", fifo],
        ["potential", demo_path, "--data", data, "--plot", fifo],
        ["profile", demo_path, "--json", fifo],
        ["inspect", demo_path, "--json", fifo],
        ["passes", "--json", fifo],
    ]
    try:
        for args in cases + [["run", demo_path, "--passes", "fold-bn", "-o", specials[1][1]]]:
            res = prunec_cli(*args)
            assert res.exit_code == 2, (args, res.output)
            err = prunec_cli.one_line_error(res)
            assert "FIFO" in err or "socket" in err or "not a folder" in err, err
            assert not (tmp_path / "m.onnx").exists()
        assert files_in(tmp_path) == {path.name for _, path in specials}
        assert os.path.exists(fifo) and not os.path.isfile(fifo)
    finally:
        sock.close()


def test_symlink_policy_writes_the_target_and_keeps_the_link(prunec_cli, tmp_path, demo_path):
    """README: an output that is a symlink stays a symlink; the file it points to is replaced."""
    real = tmp_path / "real" / "model.onnx"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    report = tmp_path / "report-link.json"
    report.symlink_to(tmp_path / "real" / "report.json")  # dangling: the target is created
    res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", link, "--report", report, "--no-profile")
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert report.is_symlink() and (tmp_path / "real" / "report.json").is_file()
    onnx.checker.check_model(onnx.load(str(real)))
    assert files_in(tmp_path / "real") == {"model.onnx", "report.json"}
    # A link to a device is refused like the device.
    dev_link = tmp_path / "dev.onnx"
    dev_link.symlink_to("/dev/null")
    res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", dev_link)
    assert res.exit_code == 2 and "a link to /dev/null" in prunec_cli.one_line_error(res)
    assert dev_link.is_symlink()


def test_unwritable_folder_fails_before_any_work(prunec_cli, tmp_path, demo_path):
    """/proc takes no new files: the model (and each report) path is probed before the passes run."""
    for args in (["-o", "/proc/x.onnx"], ["-o", tmp_path / "m.onnx", "--report", "/proc/r.json"],
                 ["-o", tmp_path / "m.onnx", "--diff", "/proc/d.html"],
                 ["-o", tmp_path / "m.onnx", "--diff-each", "/proc/diffs"]):
        res = prunec_cli("run", demo_path, "--passes", "fold-bn", *args)
        assert res.exit_code == 2, res.output
        assert "cannot create a file in /proc" in prunec_cli.one_line_error(res)
        assert files_in(tmp_path) == set()


@contextmanager
def tmpfs(path, options: str):
    """Mount a small tmpfs at `path` (root only), unmounted afterwards."""
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                         check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root; test_os_errors_at_write covers ENOSPC")
def test_full_disk_is_one_line_and_leaves_no_temp_file(prunec_cli, tmp_path, demo_path):
    """A real ENOSPC: 64 KiB of tmpfs for a 394 KiB model, and for reports after the model was written."""
    with tmpfs(tmp_path / "full", "size=64k") as full:
        res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", full / "o.onnx", "--no-profile")
        assert res.exit_code == 2
        assert prunec_cli.one_line_error(res) == \
            f"prunec: error: {full / 'o.onnx'}: cannot write: No space left on device"
        assert files_in(full) == set()
        # Fill the disk, then ask for a report there: the report write fails after the model.
        (full / "filler").write_bytes(b"x" * 60_000)
        res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", tmp_path / "o.onnx",
                         "--diff", full / "d.html", "--no-profile")
        assert res.exit_code == 2
        assert "--diff" in prunec_cli.one_line_error(res) and "No space left" in res.stderr
        assert files_in(full) == {"filler"}


@pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root")
def test_read_only_filesystem_fails_before_any_work(prunec_cli, tmp_path, demo_path):
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        res = prunec_cli("run", demo_path, "--passes", "fold-bn", "-o", ro / "o.onnx")
        assert res.exit_code == 2
        assert "Read-only file system" in prunec_cli.one_line_error(res)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, errno.EIO])
@pytest.mark.parametrize("writer", ["model", "report"])
def test_os_errors_at_write(tmp_path, small_model, monkeypatch, code, writer):
    """A fault-injecting rename (the last step of every write): one-line error, no temp file,
    the old file untouched. Covers what a tmpfs cannot make happen on demand (EIO, EPERM)."""
    target = tmp_path / ("m.onnx" if writer == "model" else "r.json")
    target.write_bytes(b"previous")

    def fail(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(ModelSaveError if writer == "model" else OutputFileError) as info:
        if writer == "model":
            save_model(small_model, target)
        else:
            write_text_atomic(target, "{}", "--report r.json")
    assert str(info.value).endswith(f"cannot write: {os.strerror(code)}")
    assert "\n" not in str(info.value)
    assert target.read_bytes() == b"previous"
    assert files_in(tmp_path) == {target.name}
