"""The sweep's folder as Tune and the trainable leave it, on a local disk or any storage pyarrow
reads (s3://...): files, the sweep's own record (sweep.json), and which of Tune's snapshots is whole.
No Ray here: reports read it after Ray is gone."""

import io
import json
import os
import pickletools
import posixpath
import re

import pyarrow.fs as pafs

from .config import ConfigError
from .files import atomic_write

SWEEP_FILE = "sweep.json"
# Tune's snapshot: one set of files per driver session (a timestamp), the experiment state as
# JSON, the searcher's and the callbacks' states as pickles
SNAPSHOT_FILE = re.compile(
    r"^(experiment_state|basic-variant-state|search_gen_state|searcher-state|callback-states)"
    r"-(?P<session>.+)\.(json|pkl)$"
)


class Storage:
    """Read-only access to an experiment folder on a local disk or a pyarrow filesystem."""

    def __init__(self, path: str):
        if "://" in path:
            self.fs, self.root = pafs.FileSystem.from_uri(path)
            self.display = path.rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(path)
            self.display = self.root

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if "://" in self.display else os.path.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        return posixpath.join(self.display, *parts) if "://" in self.display else self.join(*parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.join(*parts)).type != pafs.FileType.NotFound

    def listdir(self, *parts: str) -> list[tuple[str, bool]]:
        """(name, is_dir) of a folder's entries; [] when it is not there."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.join(*parts), allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise ConfigError(
                f"{self.uri(*parts)}: cannot list it ({e.strerror or e}); allowed: a folder this user "
                "can read"
            ) from None
        return [(i.base_name, i.type == pafs.FileType.Directory) for i in infos]

    def read_bytes(self, *parts: str) -> bytes | None:
        """The file's bytes; None when it is not there yet. One that cannot be read is an error:
        taken for missing, its trial would be reported as never started."""
        try:
            with self.fs.open_input_stream(self.join(*parts)) as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):  # (a file where a folder of the path should be)
            return None
        except OSError as e:
            raise ConfigError(
                f"{self.uri(*parts)}: cannot read it ({e.strerror or e}); allowed: a file this user can read"
            ) from None

    def read_text(self, *parts: str) -> str | None:
        data = self.read_bytes(*parts)
        return None if data is None else data.decode("utf-8", errors="replace")

    def read_json(self, *parts: str):
        return json_or_none(self.read_text(*parts))


def json_or_none(text: str | None):
    """The JSON value of `text`; None for no text or text that is not JSON (a file cut short by a kill)."""
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def experiment_exists(path: str) -> bool:
    """A Tune experiment is stored there (its snapshot or its tuner state)."""
    st = Storage(path)
    return any(n.startswith("experiment_state") or n == "tuner.pkl" for n, _ in st.listdir())


def write_meta(path: str, meta: dict) -> None:
    """Write the sweep's own record, sweep.json, whole (object stores replace a whole object at once)."""
    st, text = Storage(path), json.dumps(meta, indent=2, default=str)
    if "://" not in st.display:
        return atomic_write(st.join(SWEEP_FILE), text)
    st.fs.create_dir(st.root)
    with st.fs.open_output_stream(st.join(SWEEP_FILE)) as f:
        f.write(text.encode("utf-8"))


def read_meta(path: str) -> dict:
    meta = Storage(path).read_json(SWEEP_FILE)
    return meta if isinstance(meta, dict) else {}


def whole_snapshot_file(name: str, data: bytes | None) -> bool:
    """Whether one of Tune's snapshot files was written to its end: the experiment state parses and
    holds its trials; a pickle runs to its STOP opcode (read opcode by opcode, never unpickled)."""
    known = name.startswith("experiment_state-") or name.endswith(".pkl") or SNAPSHOT_FILE.match(name)
    if not known:
        return True
    if not data:
        return False
    if name.startswith("experiment_state-"):
        try:
            state = json.loads(data)
        except ValueError:
            return False
        return isinstance(state, dict) and "trial_data" in state
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception:  # ValueError "pickle exhausted before seeing STOP", or garbage
        return False
    return True


def usable_session(st: Storage) -> tuple[str | None, list[str]]:
    """(the newest session whose snapshot files are all whole, the files of newer sessions)."""
    sessions: dict[str, list[str]] = {}
    for name, is_dir in st.listdir():
        m = None if is_dir else SNAPSHOT_FILE.match(name)
        if m:
            sessions.setdefault(m["session"], []).append(name)
    newer: list[str] = []
    for session, files in sorted(sessions.items(), reverse=True):
        whole = all(whole_snapshot_file(n, st.read_bytes(n)) for n in files)
        if whole and f"experiment_state-{session}.json" in files:
            return session, newer
        newer += sorted(files)
    return None, newer
