import os


def atomic_write(path: str, data: bytes | memoryview | str) -> None:
    """Write a temporary file beside `path` (missing folders created), then rename it over `path`:
    a reader sees the old file or the complete new one, never a truncated one."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:  # the mode a plain open() gives (the umask's), not mkstemp's 0600
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed
            os.remove(tmp)


def write_problem(flag: str, path: str) -> str | None:
    """Why `path`, given as `flag`, cannot be written (one line), or None; checked before the work."""
    if not path:
        return f"{flag} '': an empty path; allowed: a file path"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):  # (atomic_write creates the missing ones)
        folder = os.path.dirname(folder)
    why = None
    if os.path.isdir(path):
        why = "is a folder; allowed: a file path (in a folder, created if missing)"
    elif not os.path.isdir(folder):
        why = f"{folder} is a file; allowed: a file path in a folder (created if missing)"
    elif not os.access(folder, os.W_OK | os.X_OK):
        why = f"{folder} is read-only for this user; allowed: a file path in a folder this user can write to"
    return f"{flag} {path}: {why}" if why else None
