"""Files written whole: a reader (another trial, a report viewer, a resumed sweep) sees the old
file or the complete new one, never a truncated one, and the new file gets the mode a plain
open() would give it (mkstemp's own is 0600)."""

from __future__ import annotations

import errno
import os
import tempfile


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status);
    elsewhere by setting it and putting it straight back, which another thread creating a file
    in that instant would notice."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: bytes | memoryview | str) -> None:
    """Write to a temporary file in the same folder, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _dead_link(path: str) -> str | None:
    """What the symbolic link at `path` is, if it leads nowhere (dangling, or a loop); else None.
    (os.path.exists says False for both, as for a missing path: writing there would replace the
    link with a file, and making it a folder fails with FileExistsError.)"""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
        return None
    except OSError as e:
        target = os.readlink(path)
        if e.errno == errno.ELOOP:
            return f"a symbolic link in a loop (to {target})"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"a broken symbolic link to {target}"
        return f"a symbolic link to {target} that cannot be followed ({e.strerror})"


def write_problem(flag: str, path: str) -> str | None:
    """Why the file `path`, given as `flag`, could not be written (one line naming the flag, the
    path and what is allowed), or None. Writes nothing: a command checks its output paths with this
    before its work, so a bad one is reported at once, not after the work, and nothing is half-done.
    The missing folders above `path` are created when it is written (atomic_write, Trainer.save)."""
    if not path:
        return f"{flag} {path!r}: an empty path; allowed: a file path"
    if os.path.isdir(path):
        return f"{flag} {path}: is a folder; allowed: a file path (in a folder, created if missing)"
    link = _dead_link(path)
    if link:
        return f"{flag} {path}: is {link}; allowed: a file path (remove the link, or give the path it should lead to)"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    link = _dead_link(folder)
    if link:
        return f"{flag} {path}: {folder} is {link}; allowed: a file path in a folder (created if missing)"
    if not os.path.isdir(folder):
        return f"{flag} {path}: {folder} is a file; allowed: a file path in a folder (created if missing)"
    read_only_fs = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY
    if not os.access(folder, os.W_OK | os.X_OK) or read_only_fs:
        return (f"{flag} {path}: {folder} is read-only for this user; allowed: a file path in a folder this user "
                "can write to")
    return None
