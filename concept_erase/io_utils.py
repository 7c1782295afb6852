"""Outputs: checked before the work, written atomically (temporary sibling, then rename), never over a user's
files unasked, and no litter.

- `check_writable(path, overwrite)` is what every command calls on each destination before any expensive
  work: the path is free (or `overwrite`), its parent chain is folders, and a probe file can be created
  where the output will go (read-only folders and file systems fail here, not after hours of work).
- `atomic_dir` / `atomic_file` yield a temporary sibling named `.<name>.tmp-<pid>-<host>-<random>` and rename
  it onto the destination on success. A failed write (no space, file size limit, read-only) becomes one
  `ConceptEraseError` naming the destination, and the temporary is removed.
- A kill during a save cannot run that cleanup, so every atomic write first sweeps its folder of temporaries
  of our own naming whose process (on this host) is gone, and says what it removed.
- `destination_lock(path)`: one run at a time writes a destination; a second is refused at its start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import ConceptEraseError

log = logging.getLogger(__name__)

# `.<name>.tmp-<pid>-<host>-<random>` (a write in progress) and `.<name>.old-<pid>-<host>-<random>` (the
# replaced output during an overwrite). The host tag keeps a run on one machine from sweeping the live
# temporaries of a run on another that shares the folder (e.g. a network cache).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-([0-9a-f]{8})-[^/]*$")
# Temporaries of the naming used before the pid and host were in it: swept once they are this old.
_LEGACY_RE = re.compile(r"^\..+\.(?:tmp-[a-z0-9_]{8}|old-\d+)$")
LEGACY_AGE_S = 24 * 3600
_swept: set[Path] = set()


def _prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-{_HOST}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _is_stale(entry: os.DirEntry) -> bool:
    match = _TEMP_RE.match(entry.name)
    if match:
        pid, host = int(match[1]), match[2]
        return host == _HOST and pid != os.getpid() and not _process_alive(pid)
    if _LEGACY_RE.match(entry.name):
        try:
            return time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_AGE_S
        except OSError:
            return False
    return False


def sweep_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries an interrupted (killed) run of ours left in `folder`, once per folder and
    process; log one line naming what was removed. Returns the removed paths."""
    folder = Path(folder)
    key = folder.absolute()
    if key in _swept:
        return []
    _swept.add(key)
    removed, freed = [], 0
    try:
        entries = [e for e in os.scandir(folder) if _is_stale(e)]
    except OSError:  # absent or unreadable: nothing of ours to sweep
        return []
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(path)
            else:
                freed += entry.stat(follow_symlinks=False).st_size
                path.unlink()
        except OSError:
            continue  # not ours to force: leave it
        removed.append(path)
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        log.warning("removed %d temporary file(s)/folder(s) (%.1f MB) that an interrupted run left in %s: %s",
                    len(removed), freed / 1e6, folder, names)
    return removed


def check_output_free(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work starts if `path` exists and `overwrite` is off."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConceptEraseError(f"output {str(path)!r} already exists (pass --overwrite to replace it)")
    return path


def describe_os_error(err: BaseException) -> str:
    """The reason of a failed write in a few words ("No space left on device"), without the traceback."""
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror}{where}"
    text = str(err).strip().splitlines()
    if text and "inline_container.cc" in text[0] and "Reader" not in text[0]:  # torch.save's zip writer
        return "the write came up short (no space left on the device, or a file size limit)"
    return text[0] if text else type(err).__name__


def check_writable(path: str | os.PathLike, overwrite: bool = False, *, kind: str = "dir",
                   suffix: str | None = None, flag: str | None = None, into: bool = False) -> Path:
    """Everything about an output destination that can be known before the work: not taken (unless
    `overwrite`), of the right kind when it exists (`kind` "dir" or "file"), ending in `suffix` when one is
    required, its parents folders (not files), and writable (a probe file is created and removed in the
    nearest existing folder, so read-only folders and file systems are caught). `flag` names the option in
    the message. `into`: the command writes inside an existing folder (resumes it), so the probe goes there
    and it need not be free. Also sweeps that folder of our stale temporaries."""
    path = Path(path)
    name = f"{flag} {str(path)!r}" if flag else f"output {str(path)!r}"
    if suffix is not None and path.suffix.lower() != suffix:
        raise ConceptEraseError(f"{name} must end in {suffix}")
    if path.exists() or path.is_symlink():
        if not (overwrite or into):
            raise ConceptEraseError(f"{name} already exists (pass --overwrite to replace it)")
        if kind == "dir" and not path.is_dir():
            raise ConceptEraseError(f"{name} exists and is a file, not a folder")
        if kind == "file" and path.is_dir():
            raise ConceptEraseError(f"{name} exists and is a folder, not a file")
    parent = path.absolute() if into and path.is_dir() else path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            raise ConceptEraseError(f"{name}: {str(parent)!r} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise ConceptEraseError(f"{name} cannot be created: {str(parent)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=_prefix(Path(".write-probe"), "tmp"), dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConceptEraseError(f"{name} cannot be written: {describe_os_error(err)}") from None
    sweep_stale_temporaries(parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(tmp: Path, mode: int) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give the output the mode a plain mkdir/open would."""
    os.chmod(tmp, mode & ~_umask())


def _publish_tree(tmp: Path) -> None:
    """`_publish_mode` for a folder and all it holds: safetensors (so diffusers' save_pretrained, deltas, masks)
    writes its files 0600, and an output folder's files should have the user's normal mode."""
    for folder, dirs, files in os.walk(tmp):
        for name in dirs:
            _publish_mode(Path(folder) / name, 0o777)
        for name in files:
            file = Path(folder) / name
            if not file.is_symlink():
                _publish_mode(file, 0o777 if os.access(file, os.X_OK) else 0o666)
    _publish_mode(tmp, 0o777)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def is_write_failure(err: BaseException) -> bool:
    """Whether `err` means "the write failed" (full disk, file size limit, read-only, no permission): the OS's
    errors, and what torch and safetensors raise for the same causes (they wrap errno in their own types)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT,
                             errno.EIO, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)
    text = str(err)
    if type(err).__name__ == "SafetensorError":  # "Error while serializing: I/O error: File too large (os error 27)"
        return "I/O error" in text or "IoError" in text
    # torch.save's zip writer: "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" when a
    # write came up short, "PytorchStreamWriter failed writing file ...: file write failed" on ENOSPC
    return isinstance(err, RuntimeError) and ("inline_container.cc" in text or "file write failed" in text)


@contextlib.contextmanager
def _publishing(path: Path, tmp: Path) -> Iterator[None]:
    """Around an atomic block: remove `tmp` on any error, and turn a failed write into one line."""
    try:
        yield
    except BaseException as err:
        _remove(tmp)
        if is_write_failure(err):
            raise ConceptEraseError(f"cannot write {str(path)!r}: {describe_os_error(err)}") from None
        raise


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConceptEraseError(f"cannot create the folder of {str(path)!r}: {describe_os_error(err)}") from None
    sweep_stale_temporaries(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed."""
    path = check_output_free(path, overwrite)
    _make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(path, "tmp"), dir=path.parent))
    except OSError as err:
        raise ConceptEraseError(f"cannot write {str(path)!r}: {describe_os_error(err)}") from None
    with _publishing(path, tmp):
        yield tmp
        _publish_tree(tmp)
        if path.exists():
            old = path.with_name(_prefix(path, "old") + secrets.token_hex(4))
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the previous output stays whole
                raise
            _remove(old)
        else:
            os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; on success it is renamed onto `path`."""
    path = check_output_free(path, overwrite)
    _make_parent(path)
    try:
        fd, name = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
    except OSError as err:
        raise ConceptEraseError(f"cannot write {str(path)!r}: {describe_os_error(err)}") from None
    os.close(fd)
    tmp = Path(name)
    with _publishing(path, tmp):
        yield tmp
        _publish_mode(tmp, 0o666)
        os.replace(tmp, path)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file `path` (created if absent) for the block, so concurrent
    runs sharing a folder take turns instead of doing the same work twice; says so when it has to wait.
    The lock dies with its process, so a killed run never leaves it held."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another run that is %s", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def destination_lock(path: str | os.PathLike, flag: str = "--output", *, take: bool = True) -> Iterator[None]:
    """One run at a time writes `path`: the lock file `<path>.lock` beside it, created atomically (O_EXCL) and
    holding this process's pid and host, removed when the block ends, whatever happens. A second run is refused
    at its start with one line naming the holder, before any work (it would find out only after training that
    the destination was taken). A lock whose process is gone (on this host: a killed run) is stale and taken
    over. `take=False` (the other processes of one distributed run) holds nothing."""
    if not take:
        yield
        return
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    created = [p for p in reversed(lock.parents) if not p.exists()]
    _make_parent(lock)
    try:
        _take_lock(lock, path, flag)
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        _remove_created(created)


def check_unlocked(path: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse `path` if another run holds its lock (`destination_lock`), without taking it: `erase` asks this
    before the job's imports (seconds), so a second run is refused at once; the job still takes the lock."""
    if os.environ.get("RANK", "0") != "0":
        return  # a launch's other processes (torch's RANK, set before torch loads) share the main one's lock
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    holder = _holder(lock) if lock.exists() else None
    if holder is not None:
        _refuse_held(lock, path, flag, holder)


def _holder(lock: Path) -> tuple[int | None, str | None] | None:
    """(pid, host) of the run holding an existing `lock` (None, None: unreadable, held all the same), or None
    when the lock is stale: written on this host by a process that is gone."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split()
        pid = int(pid)
    except (OSError, ValueError):  # being written this instant, or not ours: held
        return None, None
    if host == _HOST and pid != os.getpid() and not _process_alive(pid):
        return None
    return pid, host


def _refuse_held(lock: Path, path: Path, flag: str, holder: tuple[int | None, str | None]) -> None:
    pid, host = holder
    who = f"run {pid}" + ("" if host == _HOST else " on another machine") if pid else "another run"
    raise ConceptEraseError(f"{flag} {str(path)!r} is being written by {who} (lock {str(lock)!r}); wait "
                            "for it to finish, or remove the lock if no run is writing there") from None


def _take_lock(lock: Path, path: Path, flag: str) -> None:
    for _ in range(2):  # a stale lock is removed once, then taken
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is None:
                log.warning("removed the lock %s of a run that is gone", lock)
                lock.unlink(missing_ok=True)
                continue
            _refuse_held(lock, path, flag, holder)
        except OSError as err:
            raise ConceptEraseError(f"cannot lock {flag} {str(path)!r}: {describe_os_error(err)}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {_HOST}\n")
        return
    raise ConceptEraseError(f"cannot lock {flag} {str(path)!r}: {str(lock)!r} keeps coming back")


def _remove_created(folders: list[Path]) -> None:
    """Remove the folders a lock created for itself, deepest first, where they are still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return
