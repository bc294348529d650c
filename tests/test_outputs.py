"""Output files of `freedit generate` (runtime/outputs.py): devices and FIFOs are written in place and
never renamed over, symlinks are followed, and the outputs of one command are written all or none.

Nothing outside the test's folder is touched: devices are reached through symlinks made in tmp
(a rename would replace the link, never /dev/full itself), FIFOs and sockets are made in tmp, and
a full disk is RLIMIT_FSIZE in a subprocess (writes fail with EFBIG, as on a full disk).
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from freedit.cli import main
from freedit.runtime.outputs import OutputError, check_output, check_output_folder, write_outputs

FAST = ["--classes", "0-1", "--per-class", "1", "--steps", "3", "--no-progress"]


def generate(capfd, *args) -> tuple[int, str, str]:
    capfd.readouterr()
    try:
        rc = main(["generate", *FAST, *map(str, args)])
    except SystemExit as exc:
        rc = exc.code
    out, err = capfd.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("freedit generate: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.fixture
def device_link(tmp_path):
    def make(device: str) -> Path:
        if not os.path.exists(device) or not stat.S_ISCHR(os.stat(device).st_mode):
            pytest.skip(f"{device} is not a character device here")
        link = tmp_path / f"{Path(device).name}.png"
        link.symlink_to(device)
        return link
    return make


def test_full_device_gives_enospc_exit_2_and_stays_a_device(capfd, tmp_path, device_link):
    """--out onto /dev/full: the write fails with ENOSPC (exit 2), nothing is renamed over it."""
    link = device_link("/dev/full")
    rc, _, err = generate(capfd, "--out", link)
    assert rc == 2 and "No space left on device" in one_error(err)
    assert link.is_symlink() and os.readlink(link) == "/dev/full"  # not replaced by a regular file
    assert stat.S_ISCHR(os.stat(link).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.png"]  # no temporary left
    # --stats onto it: the grid (a regular file) is staged but never renamed into place.
    rc, _, err = generate(capfd, "--out", tmp_path / "g.png", "--stats", link, "--samples-dir", tmp_path / "each")
    assert rc == 2 and "No space left on device" in one_error(err) and "no output was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.png"] and stat.S_ISCHR(os.stat(link).st_mode)


def test_null_device_is_written_in_place(capfd, tmp_path, device_link):
    link = device_link("/dev/null")
    rc, out, err = generate(capfd, "--out", link, "--stats", tmp_path / "s.json")
    assert rc == 0, err
    assert link.is_symlink() and stat.S_ISCHR(os.stat(link).st_mode)
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["images"] == 2


def test_fifo_is_written_in_place_and_a_fifo_nobody_reads_is_refused(capfd, tmp_path):
    fifo = tmp_path / "grid.png"
    os.mkfifo(fifo)
    rc, _, err = generate(capfd, "--out", fifo)  # no reader: refused, not waited on
    assert rc == 2 and "nobody is reading the FIFO" in one_error(err)
    received = {}

    def read():
        with open(fifo, "rb") as f:
            received["data"] = f.read()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc, _, err = generate(capfd, "--out", fifo)
    reader.join(30)
    assert rc == 0, err
    assert is_png(received["data"]) and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_socket_and_block_like_targets_are_refused_before_sampling(capfd, tmp_path):
    path = tmp_path / "sock.png"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        rc, out, err = generate(capfd, "--out", path)
        assert rc == 2 and "is a socket" in one_error(err) and "wrote" not in out
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        server.close()


def test_symlink_target_is_replaced_and_the_link_kept(capfd, tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "link.png"
    link.symlink_to("real.png")
    rc, _, err = generate(capfd, "--out", link)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == "real.png"
    assert is_png(target.read_bytes()) and stat.S_IMODE(target.stat().st_mode) == 0o640
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to("nowhere.png")
    rc, _, err = generate(capfd, "--out", dangling)
    assert rc == 2 and "which does not exist" in one_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.png", "link.png", "real.png"]


def test_samples_dir_is_not_created_when_a_later_check_fails(capfd, tmp_path):
    for bad in (["--classes", "0,10"], ["--steps", "0"], ["--sampler", "magic"]):
        capfd.readouterr()
        rc = main(["generate", "--no-progress", "--out", str(tmp_path / "g.png"),
                   "--samples-dir", str(tmp_path / "each"), *bad])
        assert rc == 2, bad
        assert not (tmp_path / "each").exists(), bad
    assert list(tmp_path.iterdir()) == []


# Lowers the file size limit, then runs the CLI: argv = [limit, freedit args...].
LIMITED = """\
import resource, signal, sys
n = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
from freedit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_limited(limit: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_disk_full_on_the_stats_leaves_neither_the_png_nor_a_temporary(tmp_path):
    """The PNGs (~0.5 KB) fit the 1000-byte limit, the stats JSON (~1.3 KB) does not: no output at all is left,
    not a PNG beside a stats.json.tmp; a previous grid of that name is kept as it was."""
    (tmp_path / "g.png").write_bytes(b"previous grid")
    proc = run_limited(1000, "generate", *FAST, "--scale", "1", "--out", tmp_path / "g.png",
                       "--stats", tmp_path / "stats.json", "--samples-dir", tmp_path / "each")
    assert proc.returncode == 2, proc.stderr
    assert "File too large" in one_error(proc.stderr) and "no output was written" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]
    assert (tmp_path / "g.png").read_bytes() == b"previous grid"


def test_write_outputs_units(tmp_path):
    """The module on its own: folders are refused as files, read-only files refused, one level of
    missing folder created only on write, and a failed write removes what it staged."""
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path / "dir")
    ro = tmp_path / "ro.png"
    ro.write_bytes(b"x")
    ro.chmod(0o444)
    if not os.access(ro, os.W_OK):  # root ignores file modes
        with pytest.raises(OutputError, match="read-only"):
            check_output(ro)
    with pytest.raises(OutputError, match="does not exist"):
        check_output_folder(tmp_path / "a" / "b")
    folder = check_output_folder(tmp_path / "new")
    assert not folder.exists()
    write_outputs({folder / "one.bin": b"1", tmp_path / "two.bin": b"2"})
    assert (folder / "one.bin").read_bytes() == b"1" and (tmp_path / "two.bin").read_bytes() == b"2"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="nobody is reading"):
        write_outputs({tmp_path / "new2" / "x.bin": b"x", fifo: b"y", tmp_path / "two.bin": b"changed"})
    assert not (tmp_path / "new2").exists() and (tmp_path / "two.bin").read_bytes() == b"2"
    assert not [p for p in tmp_path.rglob("*.tmp")]
