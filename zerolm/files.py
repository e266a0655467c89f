"""Atomic writes: a crash never leaves a half-written file or directory behind. What they leave
has the umask's usual mode (0644/0755 under umask 022), not tempfile's private 0600/0700."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only be read
    by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode(executable: bool = False) -> int:
    """The mode open() gives a new file under the current umask: 0644 under umask 022."""
    return (0o777 if executable else 0o666) & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def publish_tree(root: str | Path) -> None:
    """Give `root` and everything under it the umask's usual modes: files written 0600 by
    tempfile or safetensors' save_file become 0644 under umask 022 (executables 0755)."""
    fmode, xmode, dmode = file_mode(), file_mode(executable=True), dir_mode()
    os.chmod(root, dmode)
    for top, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(top, d), dmode)
        for f in files:
            p = os.path.join(top, f)
            if not os.path.islink(p):
                os.chmod(p, xmode if os.stat(p).st_mode & 0o111 else fmode)


def disk_full(e: BaseException) -> bool:
    """Is `e` a write that failed for want of space (a full disk or quota), whatever library raised
    it?"""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


@contextmanager
def writing_into(directory: str | Path, what: str):
    """A full disk while writing `what` into `directory` becomes a one-line ValueError naming both
    (the writes are atomic, so nothing partial stays behind to be picked up)."""
    try:
        yield
    except Exception as e:
        if not disk_full(e):
            raise
        raise ValueError(
            f"could not write {what} into {directory}: the disk is full; nothing partial was kept. "
            "Free space there (or choose another --out) and run the command again"
        ) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 -> the umask's mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors' save_file, atomically (streamed to a temp sibling, then renamed) and with the
    umask's mode rather than the 0600 save_file gives its files."""
    from safetensors.torch import save_file  # here, not at the top: the CLI starts without torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed.
    Everything in it ends with the umask's usual modes, whatever wrote it."""
    path = Path(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        publish_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # leave no empty directories behind: a failed run changes nothing
            try:
                p.rmdir()
            except OSError:
                break
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
