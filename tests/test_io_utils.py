"""Atomic outputs: all or nothing, never over a user's files unasked, with ordinary permissions."""

import os
import stat

import pytest

from concept_erase.errors import ConceptEraseError
from concept_erase.io_utils import atomic_dir, atomic_file


def test_atomic_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder

    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
    with pytest.raises(ConceptEraseError, match="already exists"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["b.txt"]


def test_atomic_file_is_all_or_nothing(tmp_path):
    out = tmp_path / "f.json"
    out.write_text("the user's")
    with pytest.raises(ConceptEraseError, match="already exists"):
        with atomic_file(out) as tmp:
            tmp.write_text("new")
    assert out.read_text() == "the user's" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_outputs_get_the_modes_of_a_plain_mkdir_and_open(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("f")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755  # mkdtemp alone would leave 0700
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644  # mkstemp alone would leave 0600


def test_files_written_private_inside_an_output_folder_get_the_normal_mode(tmp_path):
    """safetensors writes 0600 (a delta, diffusers' weights): the published folder has the user's modes."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "delta") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "delta.safetensors"))
            (tmp / "unet").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "delta" / "delta.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "delta" / "unet").stat().st_mode) == 0o755


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_failed_write_is_one_line_naming_the_output_and_leaves_nothing(tmp_path):
    import resource

    from safetensors.torch import save_file
    import torch

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # like `ulimit -f 4`: writes past it fail (EFBIG)
    try:
        with pytest.raises(ConceptEraseError, match=r"cannot write '.*w\.safetensors': .*(File too large|I/O)"):
            with atomic_file(tmp_path / "w.safetensors") as tmp:
                save_file({"w": torch.zeros(10_000)}, str(tmp))
        with pytest.raises(ConceptEraseError, match=r"cannot write '.*opt': the write came up short"):
            with atomic_dir(tmp_path / "opt") as tmp:
                torch.save({"w": torch.zeros(10_000)}, tmp / "optimizer.pt")
        with pytest.raises(ConceptEraseError, match=r"cannot write '.*big\.txt': File too large"):
            with atomic_file(tmp_path / "big.txt") as tmp:
                tmp.write_bytes(b"0" * 10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_the_old_output_when_the_new_one_cannot_be_renamed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ConceptEraseError, match="No space left on device"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"


def test_check_writable_refuses_what_would_fail_later(tmp_path):
    from concept_erase.io_utils import check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConceptEraseError, match=r"--out '.*file/sub/out' cannot be created: '.*file' is a file"):
        check_writable(tmp_path / "file" / "sub" / "out", flag="--out")
    with pytest.raises(ConceptEraseError, match=r"'.*model\.ckpt' must end in \.safetensors"):
        check_writable(tmp_path / "model.ckpt", kind="file", suffix=".safetensors")
    with pytest.raises(ConceptEraseError, match="already exists"):
        check_writable(tmp_path / "file")
    with pytest.raises(ConceptEraseError, match="is a file, not a folder"):
        check_writable(tmp_path / "file", overwrite=True, kind="dir")
    assert check_writable(tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the check creates nothing


def test_check_writable_refuses_a_read_only_file_system(tmp_path, monkeypatch):
    import tempfile

    from concept_erase.io_utils import check_writable

    def read_only(*args, **kwargs):  # what mkstemp meets on a read-only mount (root ignores chmod, so simulate)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ConceptEraseError, match=r"--output '.*out' cannot be written: Read-only file system"):
        check_writable(tmp_path / "out", flag="--output")


def test_stale_temporaries_of_dead_runs_are_swept_and_reported(tmp_path, caplog):
    from concept_erase import io_utils

    dead, live = _dead_pid(), os.getppid()
    host = io_utils._HOST
    stale_dir = tmp_path / f".model.tmp-{dead}-{host}-abcd1234"
    stale_dir.mkdir()
    (stale_dir / "unet.safetensors").write_bytes(b"0" * 1000)
    stale_file = tmp_path / f".w.safetensors.tmp-{dead}-{host}-xyz"
    stale_file.write_bytes(b"0" * 10)
    live_tmp = tmp_path / f".model.tmp-{live}-{host}-efgh5678"  # a concurrent run still writing: kept
    live_tmp.mkdir()
    other_host = tmp_path / f".model.tmp-{dead}-00000000-ijkl"  # another machine's (shared folder): kept
    other_host.mkdir()
    users = tmp_path / ".model.tmp-notes"  # not our naming: kept
    users.write_text("mine")
    with caplog.at_level("WARNING", logger="concept_erase.io_utils"):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live_tmp.name, other_host.name, users.name, "model"])
    assert "removed 2 temporary file(s)/folder(s)" in caplog.text and stale_dir.name in caplog.text


def test_exclusive_lock_makes_the_second_holder_wait(tmp_path, caplog):
    import threading
    import time

    from concept_erase.io_utils import exclusive_lock

    order = []

    def second():
        with exclusive_lock(tmp_path / ".lock", "testing"):
            order.append("second")

    with caplog.at_level("WARNING", logger="concept_erase.io_utils"):
        with exclusive_lock(tmp_path / ".lock", "testing"):
            thread = threading.Thread(target=second)
            thread.start()
            time.sleep(0.3)
            order.append("first")
        thread.join(10)
    assert order == ["first", "second"] and "waiting for another run that is testing" in caplog.text


def test_destination_lock_refuses_a_second_run_and_takes_over_a_stale_lock(tmp_path):
    """Two processes writing one output: the second is refused at its start; a lock whose process is gone (a
    killed run) is taken over; the lock goes when its block ends, error or not."""
    import subprocess
    import sys

    from concept_erase.io_utils import destination_lock

    out = tmp_path / "deeper" / "erased"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from concept_erase.io_utils import destination_lock\n"
        f"with destination_lock({str(out)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConceptEraseError, match=rf"^--output '{out}' is being written by run {holder.pid} "):
            with destination_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock stays behind, stale, and the next run takes it over
    assert (tmp_path / "deeper" / "erased.lock").is_file()
    with pytest.raises(RuntimeError, match="mid-run"):
        with destination_lock(out):
            assert (tmp_path / "deeper" / "erased.lock").read_text().split()[0] == str(os.getpid())
            raise RuntimeError("mid-run")
    assert list((tmp_path / "deeper").iterdir()) == []  # the lock is gone
    with destination_lock(tmp_path / "made" / "here"):
        assert (tmp_path / "made" / "here.lock").is_file()
    assert not (tmp_path / "made").exists()  # so is a folder the lock made for itself
