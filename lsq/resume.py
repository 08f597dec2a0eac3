"""Resuming a sweep: one driver per sweep, Tune's snapshots repaired, and what a resume keeps."""

import contextlib
import os
import re
import shlex
import socket
import sys
import time

from .config import ConfigError, TrialConfig
from .space import Space
from .storage import SNAPSHOT_FILE, Storage, read_meta, usable_session, whole_snapshot_file

LOCK_FILE = ".sweep.lock"
SWEEP_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweep.py")


def running_driver(experiment: str) -> str | None:
    """Who holds the sweep's lock (see `one_driver`) now, or None (also where files cannot be locked)."""
    import fcntl

    path = os.path.join(experiment, LOCK_FILE)
    if "://" in experiment or not os.path.isfile(path):
        return None
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "another process"
        except OSError:  # e.g. NFS without its lock service
            return None
        return None


def running_text(name: str, experiment: str, holder: str) -> str:
    return (
        f"sweep '{name}' is running now ({holder}) in {experiment}. Wait for it, or stop it (Ctrl-C) and "
        f"then --resume; or start another sweep with --name {name}-2"
    )


@contextlib.contextmanager
def one_driver(experiment: str, name: str):
    """Two drivers of one sweep would have two Tunes write the same trial folders. The driver holds
    an exclusive lock on <experiment>/.sweep.lock for its life; the kernel releases it however the
    driver ends. Local paths only (cloud storage has no locks). A folder holding nothing but the
    lock afterwards (Ray failed to start) is removed."""
    import fcntl

    if "://" in experiment:
        yield
        return
    path = os.path.join(experiment, LOCK_FILE)
    try:
        os.makedirs(experiment, exist_ok=True)
        lock = open(path, "a+")  # close-on-exec: Ray's processes do not inherit it
    except OSError as e:
        raise ConfigError(f"--storage: cannot write in {experiment} ({e.strerror or e})") from None
    mine = False  # the lock is this driver's: it may tidy up
    try:
        for attempt in range(20):  # a `running_driver` check holds a shared lock for a moment
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine = True
                break
            except BlockingIOError:
                if attempt == 19:
                    lock.seek(0)
                    raise ConfigError(
                        running_text(name, experiment, lock.read().strip() or "another process")
                    ) from None
                time.sleep(0.05)
            except OSError as e:  # a file system without locks
                print(
                    f"warning: cannot lock {path} ({e.strerror or e}): nothing stops a second driver of this "
                    "sweep",
                    file=sys.stderr,
                )
                mine = True
                break
        lock.seek(0)
        lock.truncate()
        lock.write(
            f"driver pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        lock.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            if mine and os.listdir(experiment) == [LOCK_FILE]:
                os.remove(path)
                os.rmdir(experiment)
        lock.close()


def recover_snapshot(path: str, name: str) -> list[str]:
    """Set aside (rename to NAME.cut) every snapshot file newer than the newest whole session, so
    that Tune restores from that one; returns their names. A ConfigError, renaming nothing, when no
    session is whole or tuner.pkl is cut short."""
    st = Storage(path)
    problem = None
    session, newer = usable_session(st)
    if st.exists("tuner.pkl") and not whole_snapshot_file("tuner.pkl", st.read_bytes("tuner.pkl")):
        problem = f"{st.uri('tuner.pkl')} was cut short when a driver was killed while writing it"
    elif session is None:
        cut = ", ".join(newer) or "no experiment_state-*.json"
        problem = f"every snapshot Tune left in {st.display} was cut short when a driver was killed while writing it"
        problem += f" ({cut})"
    if problem:
        raise ConfigError(
            f"--resume: cannot resume sweep '{name}': {problem}. Start it again with --name {name}-2; "
            f"its trials' checkpoints stay in {path}"
        )
    for file in newer:
        st.fs.move(st.join(file), st.join(file + ".cut"))
    # copies a killed driver left unfinished (ray_fixes.whole_file_snapshots)
    tmp = re.compile(r"^\.(?P<name>.+)\.\d+\.tmp$")
    for file, is_dir in st.listdir():
        if not is_dir and tmp.match(file) and SNAPSHOT_FILE.match(tmp.match(file)["name"]):
            st.fs.delete_file(st.join(file))
    if newer:
        print(
            f"note: Tune's newest snapshot of this sweep was cut short (its driver was killed while writing it). "
            f"Resuming from the one before: the epochs trained since are trained again, and a trial whose "
            f"checkpoint of then has been deleted since ends in ERROR. Set aside as *.cut: {', '.join(newer)}"
        )
    return newer


def resume_notes(args, space: Space, experiment: str, stored: dict) -> None:
    """What a resume will not take from this command line: a changed space, changed flags."""
    warn_if_space_changed(space, experiment, stored)
    ignored = ignored_on_resume(args, stored)
    if ignored:
        print(f"note: a resumed sweep keeps the settings it started with; ignored: {'; '.join(ignored)}")


def ignored_on_resume(args, stored: dict) -> list[str]:
    """Flags given with --resume that differ from what the sweep started with (Tune restores
    resources, retries, the concurrency limit and the loggers), each with the value it keeps."""
    if not stored:
        return []  # no sweep.json: the flags apply
    res = stored.get("resources") or {}
    kept = {"cpus_per_trial": res.get("cpu"), "gpus_per_trial": res.get("gpu")}
    kept |= {key: stored.get(key) for key in ("max_failures", "max_concurrent", "tensorboard")}
    out = []
    for key, value in kept.items():
        given = getattr(args, key)
        if given not in (None, False) and given != value:
            value = "no limit" if value is None else _values([value])
            out.append(f"--{key.replace('_', '-')} {_values([given])} (keeps {value})")
    return out


def warn_if_space_changed(space: Space, experiment: str, stored: dict | None = None) -> None:
    """Tune resumes the trials it stored with the configs they started with: say so when the space
    (its file, or --set) now asks for other trials or values."""
    from .report import count, stored_configs

    name = os.path.basename(experiment.rstrip("/"))
    way_out = f"--resume continues the stored trials as they started (a new sweep: --name {name}-2)"
    created = (read_meta(experiment) if stored is None else stored).get("trials")
    if created not in (None, len(space.trials)):
        print(
            f"note: the space now has {count(len(space.trials), 'trial')}, the stored sweep {created}: {way_out}"
        )
        return
    # trial i runs point i; only the trials Tune has created so far compare
    now = space.points()
    pairs = [(c, now[i]) for i, c in sorted(stored_configs(experiment).items()) if i < len(now)]
    changed = []
    for key in TrialConfig.keys():
        differ = [(old[key], new[key]) for old, new in pairs if repr(old[key]) != repr(new[key])]
        if differ:
            changed.append(f"{key} {_values([o for o, _ in differ])} -> {_values([n for _, n in differ])}")
    if changed:
        print(f"note: the space now differs from the stored sweep ({'; '.join(changed)}): {way_out}")


def _values(values: list) -> str:
    """One key's values across the trials: `8`, or `{0.05, 0.001}`."""
    values = list(dict.fromkeys(values))
    text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return text if len(values) == 1 else "{" + text + "}"


def resume_command(argv: list[str], resume: bool = True) -> str:
    """The exact command that continues this sweep."""
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "sweep.py" else os.path.relpath(SWEEP_PY)
    args = [a for a in argv if a not in ("--resume", "--dry-run", "--report-only")]
    return shlex.join(["python", script, *args] + (["--resume"] if resume else []))


def interrupted_text(args, argv: list[str]) -> str:
    """What to do after Ctrl-C: resume a sweep Tune has stored, or start again one it has not."""
    from .storage import experiment_exists

    experiment = getattr(args, "experiment", None)
    if args.report_only or args.dry_run:
        return "\ninterrupted."
    try:
        stored = experiment is not None and (args.resume or experiment_exists(experiment))
    except Exception:  # storage unreachable: the resume command is the safer advice
        stored = True
    if stored:
        return f"\ninterrupted. Resume with:\n  {resume_command(argv)}"
    return (
        f"\ninterrupted before the sweep started (nothing to resume). Start it again with:\n  "
        f"{resume_command(argv, resume=False)}"
    )
