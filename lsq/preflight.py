"""Checks before Ray starts: what a sweep reads and where it writes, so that a mistake costs one
`error:` line and nothing written, not a cluster start."""

import os
import shlex
import socket

from .config import ConfigError, data_missing
from .space import Space


def check_address(address: str) -> tuple[str, int] | None:
    """--address as written: auto, local, HOST:PORT or ray://HOST:PORT. (host, port), or None for auto/local."""
    if address in ("auto", "local"):
        return None
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not (host.strip("[]") and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"--address {shlex.quote(address)}: expected auto, HOST:PORT or ray://HOST:PORT, with a port in 1..65535"
        )
    return host, int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a wrong host:port (Ray itself retries for minutes)."""
    target = check_address(address)
    if target is None:
        return
    host, port = target
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
    except (OSError, UnicodeError) as e:
        raise ConfigError(
            f"--address {address}: nothing answers at {host}:{port} ({getattr(e, 'strerror', None) or e}). "
            "Is the cluster up (`ray start --head` prints its address)?"
        ) from None


def check_inputs(space: Space, local: bool) -> list[str]:
    """Every init_from loads and fits its model; on a local Ray every data_dir holds its data set
    (ImageNet must; a CIFAR folder without it is a note: each trial downloads it). Returns the notes."""
    from .train import check_init_from

    checked, notes = set(), []
    for i, t in enumerate(space.trials, start=1):
        where = f"{space.path} (trial {i}, {t.label()})"
        if t.init_from and (t.init_from, t.model, t.dataset, t.data_dir) not in checked:
            checked.add((t.init_from, t.model, t.dataset, t.data_dir))
            try:
                check_init_from(t)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if (
            not local
            or t.dataset == "digits"
            or "://" in (t.data_dir or "")
            or (t.dataset, t.data_dir) in checked
        ):
            continue
        checked.add((t.dataset, t.data_dir))
        elsewhere = "(--set data_dir=...), or --address for a cluster whose nodes hold it"
        if not os.path.isdir(t.data_dir or ""):
            raise ConfigError(
                f"{where}: key 'data_dir' = {t.data_dir!r}: no such folder on this machine; allowed: "
                f"the folder holding {t.dataset} {elsewhere}"
            )
        missing = data_missing(t.dataset, t.data_dir)
        if missing and t.dataset == "imagenet":  # nothing downloads ImageNet
            raise ConfigError(
                f"{where}: key 'data_dir' = {t.data_dir!r} holds no ImageNet: {missing}; allowed: the "
                f"folder holding it {elsewhere}"
            )
        if missing:
            notes.append(
                f"data_dir {t.data_dir} holds no {t.dataset} yet ({missing}): each trial will try to "
                "download it there, one at a time (torchvision's archive, if it is there already, is unpacked "
                "instead; without it and without a network every trial fails)"
            )
    return notes


def check_storage(storage: str, write: bool = True) -> None:
    """A local --storage lies in a folder this user can write in (write=False: any path will do);
    a URI names storage that pyarrow reaches."""
    local = storage.removeprefix("file://")
    if "://" not in local:
        if write:
            check_folder("--storage", local, " or a URI such as s3://bucket/runs", given=storage)
        return
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(storage)
        fs.get_file_info(root)
    except Exception as e:
        raise ConfigError(f"--storage {storage}: cannot use it ({type(e).__name__}: {e})") from None


def check_folder(flag: str, path: str, or_else: str = "", given: str | None = None) -> None:
    """`path`, or the nearest folder above it that exists, is a folder this user can write in."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    given = path if given is None else given
    if not os.path.isdir(folder):
        raise ConfigError(
            f"{flag} {given}: {folder} is a file; allowed: a folder (created if missing){or_else}"
        )
    if not os.access(folder, os.W_OK | os.X_OK) or os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise ConfigError(
            f"{flag} {given}: {folder} is read-only for this user; allowed: a folder this user can "
            f"write to{or_else}"
        )


def check_reports(reports: str, name: str) -> None:
    if "://" in reports:
        raise ConfigError(
            f"--reports {reports}: a URI; allowed: a local folder (--storage is the one that takes URIs)"
        )
    check_folder("--reports", os.path.join(reports, name), given=reports)


def create_storage(storage: str) -> None:
    """Create a local storage folder now: os.access can say yes where creating fails (NFS root
    squashing), and Tune's own attempt would fail after Ray has started."""
    if "://" not in storage:
        try:
            os.makedirs(os.path.abspath(storage), exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"--storage {storage}: cannot create it ({e.strerror or e}); allowed: a folder this user "
                "can write to, or a URI such as s3://bucket/runs"
            ) from None
