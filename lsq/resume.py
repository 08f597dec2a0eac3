"""Resuming a sweep: Tune's snapshots repaired, one driver per sweep."""

from __future__ import annotations

from .storage import SNAPSHOT_FILE, Storage, usable_session, whole_snapshot_file


class SnapshotError(Exception):
    """No whole snapshot of the experiment is left to resume from."""


def recover_snapshot(path: str) -> list[str]:
    """Before a resume: set aside (rename to NAME.cut) every snapshot file newer than the newest
    whole session, so that Tune restores from that one. Returns the names set aside. Raises
    SnapshotError, renaming nothing, when no session is whole or tuner.pkl is cut."""
    st = Storage(path)
    if st.exists("tuner.pkl") and not whole_snapshot_file("tuner.pkl", st.read_bytes("tuner.pkl")):
        raise SnapshotError(f"{st.uri('tuner.pkl')} was cut short when a driver was killed while writing it")
    session, newer = usable_session(st)
    if session is None:
        raise SnapshotError(f"every snapshot Tune left in {st.display} was cut short when a driver was killed "
                            f"while writing it ({', '.join(newer) or 'no experiment_state-*.json'})")
    for name in newer:
        st.rename(name, name + ".cut")
    for name, is_dir in st.listdir():  # copies a killed driver left unfinished (sweep.whole_file_snapshots)
        if not is_dir and name.startswith(".") and name.endswith(".tmp") and SNAPSHOT_FILE.match(name[1:].rsplit(".", 2)[0]):
            st.fs.delete_file(st.join(name))
    return newer
