"""Run a search space as a Ray Tune sweep, resumably, and write its report.

    python sweep.py                                    # search_spaces/smoke.yaml on a local Ray
    python sweep.py search_spaces/imagenet_resnet18_paper.yaml --set data_dir=/data/imagenet --dry-run  # your folder
    python sweep.py SPACE --address auto --storage s3://bucket/runs     # on a cluster
    python sweep.py SPACE --resume                     # continue after Ctrl-C or a crash
    python sweep.py SPACE --report-only                # rebuild reports/<name>/ from storage

The flow: load + validate the space (lsq/space.py; a mistake exits 2 before anything starts or
is written) -> start a private local Ray, or join --address -> a Tuner whose trials are the
space's configs, each run by `train_lsq` (lsq/trainable.py) -> every epoch a checkpoint into
<storage>/<name>/ -> lsq/report.py turns that folder into reports/<name>/.

Choices that keep a sweep safe to interrupt:
- Tune's experiment snapshot is written after every controller step (TUNE_GLOBAL_CHECKPOINT_S=0)
  instead of every ~10 s, so a killed driver loses no checkpoint it has seen; and each of its
  files reaches local storage whole or not at all (`whole_file_snapshots`), where Tune's own copy
  left it cut short when the driver was killed mid-copy. A snapshot cut short all the same (other
  storage, an older sweep) is set aside at --resume, which then restores the one before it.
- A trial restarted after a crash keeps every result line it reported (`results_survive_a_restart`):
  Tune copied its result.json back from storage, which could lag the last report by one copy.
- Ctrl-C or SIGTERM stops Tune cleanly; the partial report and the resume command are printed.
- One driver per sweep: a second one (the command run twice, a --resume while the first still
  runs) is refused (`one_driver`).
- --resume restores the Tuner: finished trials stay finished, interrupted and errored trials
  continue from their last checkpoint.
- The local Ray listens on 127.0.0.1 only and uses a fresh auth token per sweep (Ray 2.59+ token
  authentication), so stale /tmp/ray state, ~/.ray or another sweep never get in the way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time

from lsq.config import ConfigError, data_missing
from lsq.space import Space, check_name, check_resource, format_table, load_space, read_name, trial_name

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SPACE = os.path.join("search_spaces", "smoke.yaml")
DEFAULT_STORAGE = "runs"
DEFAULT_REPORTS = "reports"
CHECKPOINTS_TO_KEEP = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python sweep.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 done, 1 some trial errored or the report could not be written, "
               "2 a mistake in the input, 130 interrupted (resume with --resume), 141 its output "
               "pipe closed")
    p.add_argument("space", nargs="?", default=None, metavar="SPACE",
                   help=f"search space YAML (default: {DEFAULT_SPACE})")
    p.add_argument("--address", help="join this Ray cluster, e.g. 'auto' after `ray start --head` "
                                     "(default: start a private local Ray on 127.0.0.1)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"experiment storage: a directory or a URI such as s3://bucket/runs "
                        f"(default: ./{DEFAULT_STORAGE}); a cluster needs shared or cloud storage")
    p.add_argument("--name", help="the sweep's name, the folder under --storage (default: the space's name)")
    p.add_argument("--resume", action="store_true", help="continue the named sweep from its checkpoints")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every trial, e.g. --set epochs=3 (repeatable)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at once")
    p.add_argument("--cpus-per-trial", type=float, metavar="N", help="override the space's resources.cpu")
    p.add_argument("--gpus-per-trial", type=float, metavar="N",
                   help="override the space's resources.gpu (a fraction packs trials onto one GPU)")
    p.add_argument("--max-failures", type=int, metavar="N",
                   help="retries of a crashed trial from its last checkpoint (default: the space's, else 2)")
    p.add_argument("--dry-run", action="store_true", help="print the trials and resources; run and write nothing")
    p.add_argument("--reports", default=DEFAULT_REPORTS, metavar="DIR",
                   help=f"where reports go, as DIR/<name>/ (default: {DEFAULT_REPORTS}/)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report of a stored sweep; run nothing")
    p.add_argument("--dashboard", action="store_true",
                   help="start the Ray dashboard and its HTTP API server, e.g. for `ray list` (local Ray only)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files per trial (Tune's logger; imports torch in the driver)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return run(args, argv)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_text(args, argv), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`--dry-run | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (or Python's exit flush complains)
        return 141  # 128 + SIGPIPE, what a shell reports for a command a closed pipe ended
    except Exception as e:  # a bug or an environment problem: one line unless --debug
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from lsq import report, resume

    if args.address is not None:
        check_address(args.address)
    space_path = _space_path(args.space)
    storage = args.storage if "://" in args.storage else os.path.abspath(args.storage)

    if args.report_only:
        name = check_name(args.name, "--name") if args.name is not None else read_name(space_path)
        check_storage(args.storage, write=False)  # reading only: an archived, read-only sweep is fine
        check_reports(args.reports, name)
        experiment = _join(storage, name)
        if not report.experiment_exists(experiment):
            raise ConfigError(f"--report-only: no sweep '{name}' in {storage} (nothing to report)")
        # a driver at work, or one that cannot be seen (cloud storage has no lock): unfinished trials may be running
        live = "://" in experiment or running_driver(experiment) is not None
        _print_report(report.build_report(experiment, args.reports, name, live=live))
        return 0

    space = load_space(space_path, args.set)
    name = check_name(args.name, "--name") if args.name is not None else space.name
    experiment = args.experiment = _join(storage, name)  # for the message should Ctrl-C come
    check_storage(args.storage)
    check_reports(args.reports, name)
    resources = dict(space.resources)
    if args.cpus_per_trial is not None:
        resources["cpu"] = check_resource("cpu", args.cpus_per_trial, "--cpus-per-trial")
    if args.gpus_per_trial is not None:
        resources["gpu"] = check_resource("gpu", args.gpus_per_trial, "--gpus-per-trial")
    max_failures = space.max_failures if args.max_failures is None else args.max_failures
    if max_failures < 0:
        raise ConfigError(f"--max-failures {max_failures}: allowed: a whole number >= 0")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent {args.max_concurrent}: allowed: a whole number >= 1")
    exists = report.experiment_exists(experiment)
    if not args.resume:  # a resumed trial continues from its checkpoints, not from these
        for note in check_inputs(space, local=not args.address):  # the dry run too: it is there to catch mistakes
            print(f"note: {note}")
    stored = check_stored(report.read_meta(experiment), experiment, name) if args.resume and exists else None
    if stored and stored.get("resources"):  # Tune would give every trial, restored ones too, the new flags' resources
        resources = {"cpu": stored["resources"]["cpu"], "gpu": stored["resources"]["gpu"]}

    running = running_driver(experiment)
    if args.resume and not exists and not running:  # (the dry run checks what the real run checks)
        raise ConfigError(f"--resume: no sweep '{name}' in {storage} to resume; start it without --resume")
    if args.dry_run:
        shown = args
        if stored:  # a resume keeps the retries, concurrency and scheduler the sweep started with: show those
            max_failures = stored.get("max_failures", max_failures)
            shown = argparse.Namespace(**{**vars(args), "max_concurrent": stored.get("max_concurrent")})
            if "early_stopping" in stored:
                space = dataclasses.replace(space, early_stopping=stored["early_stopping"])
        print(dry_run_text(space, name, resources, max_failures, experiment, shown))
        if args.resume and exists and not running:
            print("resume: the stored sweep's trials continue as they started")
            _resume_notes(args, space, experiment, stored or {})
        if running:
            print(f"note: {_running_text(name, experiment, running)}")
        elif exists and not args.resume:
            print(f"note: sweep '{name}' already exists in {storage}: a real run needs --resume or another --name")
        return 0
    if running:
        raise ConfigError(_running_text(name, experiment, running))
    if exists and not args.resume:
        raise ConfigError(
            f"sweep '{name}' already exists in {storage}. Continue it with\n  {resume_command(argv)}\n"
            f"or start a new one with --name {name}-2 (or remove {experiment})")
    if args.address:
        _check_reachable(args.address)
    if args.address and "://" not in storage:
        print(f"warning: --storage {storage} is a local path. On a multi-node Ray cluster every node writes its "
              "trials' checkpoints there, so it must be shared storage (the same NFS path on every node) or "
              "cloud storage such as --storage s3://bucket/runs.", file=sys.stderr)

    create_storage(args.storage)
    with one_driver(experiment, name):  # from here on, this driver alone writes the sweep's folder
        if args.resume:
            try:
                cut = resume.recover_snapshot(experiment)
            except resume.SnapshotError as e:
                raise ConfigError(f"--resume: cannot resume sweep '{name}': {e}. Start it again with --name "
                                  f"{name}-2; its trials' checkpoints stay in {experiment}") from None
            if cut:
                print(f"note: Tune's newest snapshot of this sweep was cut short (its driver was killed while writing "
                      f"it). Resuming from the one before: the epochs trained since are trained again, and a trial "
                      f"whose checkpoint of then has been deleted since ends in ERROR. Set aside as *.cut: "
                      f"{', '.join(cut)}")
        ray = start_ray(args)
        try:
            resources = fit_resources(ray, resources, space, local=not args.address)
            return run_sweep(args, argv, space, name, storage, experiment, resources, max_failures, stored)
        finally:
            ray.shutdown()


LOCK_FILE = ".sweep.lock"


def running_driver(experiment: str) -> str | None:
    """Who holds the sweep's lock (see `one_driver`) right now, or None (also where the file
    system cannot lock)."""
    path = os.path.join(experiment, LOCK_FILE)
    if "://" in experiment or not os.path.isfile(path):
        return None
    import fcntl  # the file exists: one_driver wrote it, so fcntl is there

    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "another process"
        except OSError:  # e.g. NFSv3 without its lock service: nothing to learn here
            return None
        return None  # closing the file drops the shared lock


def _running_text(name: str, experiment: str, holder: str) -> str:
    return (f"sweep '{name}' is running now ({holder}) in {experiment}. Wait for it, or stop it (Ctrl-C) and "
            f"then --resume; or start another sweep with --name {name}-2")


@contextlib.contextmanager
def one_driver(experiment: str, name: str):
    """One driver per sweep at a time. The same command started twice, or a --resume while the
    first driver still runs (in another terminal, or hung), would have two Tunes write the same
    trial folders. The driver holds an exclusive lock on <experiment>/.sweep.lock for its life;
    the kernel releases it however the driver ends, SIGKILL included. A local path only (NFS
    included, where its lock service works: without one the sweep warns and runs unguarded);
    cloud storage has no locks. A folder that holds nothing but the lock afterwards (Ray failed to
    start) is removed again."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        fcntl = None
    if "://" in experiment or fcntl is None:
        yield
        return
    path = os.path.join(experiment, LOCK_FILE)
    try:
        os.makedirs(experiment, exist_ok=True)
        lock = open(path, "a+")  # not inherited by the processes Ray starts (Python's files are close-on-exec)
    except OSError as e:
        raise ConfigError(f"--storage: cannot write in {experiment} ({e.strerror or e})") from None
    mine = False  # the lock is this driver's (or no lock is possible here): it may tidy up
    try:
        for attempt in range(20):  # a `running_driver` check holds a shared lock for a moment
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if attempt == 19:
                    lock.seek(0)
                    raise ConfigError(_running_text(name, experiment, lock.read().strip() or "another process")) from None
                time.sleep(0.05)
                continue
            except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks
                print(f"warning: cannot lock {path} ({e.strerror or e}): nothing stops a second driver of this "
                      "sweep", file=sys.stderr)
            mine = True
            break
        lock.seek(0)
        lock.truncate()
        lock.write(f"driver pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        yield
    finally:
        with contextlib.suppress(OSError):  # (the folder may have been removed meanwhile)
            if mine and os.listdir(experiment) == [LOCK_FILE]:
                os.remove(path)
                os.rmdir(experiment)
        lock.close()


def check_inputs(space: Space, local: bool) -> list[str]:
    """What the trials read, checked before anything starts or is written: every init_from loads
    (weights_only) and fits its model; on a local Ray, every data_dir is a folder on this machine
    (a cluster's nodes may hold data this machine doesn't) that holds its data set: ImageNet must
    be there; a CIFAR folder without it gives a note (each trial will try to download it).
    Returns the notes."""
    checked, notes = set(), []
    for i, t in enumerate(space.trials, start=1):
        where = f"{space.path} (trial {i}, {t.label()})"
        if t.init_from and (t.init_from, t.model, t.dataset, t.data_dir) not in checked:
            from lsq.train import check_init_from

            checked.add((t.init_from, t.model, t.dataset, t.data_dir))
            try:
                check_init_from(t)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if not local or t.dataset == "digits" or "://" in (t.data_dir or "") or (t.dataset, t.data_dir) in checked:
            continue
        checked.add((t.dataset, t.data_dir))
        if not os.path.isdir(t.data_dir or ""):
            raise ConfigError(f"{where}: key 'data_dir' = {t.data_dir!r}: no such folder on this machine; allowed: "
                              f"the folder holding {t.dataset} (--set data_dir=...), or --address for a cluster whose "
                              "nodes hold it")
        missing = data_missing(t.dataset, t.data_dir)
        if missing and t.dataset == "imagenet":  # nothing downloads ImageNet
            raise ConfigError(f"{where}: key 'data_dir' = {t.data_dir!r} holds no ImageNet: {missing}; allowed: the "
                              "folder holding it (--set data_dir=...), or --address for a cluster whose nodes hold it")
        if missing:
            notes.append(f"data_dir {t.data_dir} holds no {t.dataset} yet ({missing}): each trial will try to "
                         "download it there, one at a time (torchvision's archive, if it is there already, is unpacked "
                         "instead; without it and without a network every trial fails)")
    return notes


STORAGE_TIMEOUT_S = 30.0


def check_storage(storage: str, write: bool = True) -> None:
    """Fail fast, naming --storage, where the sweep could not store its trials, writing nothing: a
    local path must lie in a folder this user may create folders in (the real test is
    `create_storage`, before Ray starts; with write=False, reading a stored sweep, any path will
    do); a URI must name a file system pyarrow knows and answer within STORAGE_TIMEOUT_S (without
    a network, Google Cloud Storage retries for many minutes without a word, and Tune would wait
    as long)."""
    local = storage[len("file://"):] if storage.startswith("file://") else None  # pyarrow: a local path
    if "://" not in storage or local:
        if write:
            check_folder("--storage", local or storage, " or a URI such as s3://bucket/runs", given=storage)
        return
    outcome = []
    probe = threading.Thread(target=lambda: outcome.append(_probe_storage(storage)), daemon=True)
    probe.start()
    probe.join(min(3.0, STORAGE_TIMEOUT_S))
    if probe.is_alive():
        print(f"waiting for --storage {storage} to answer (at most {STORAGE_TIMEOUT_S:g} s)", file=sys.stderr, flush=True)
        probe.join(max(0.0, STORAGE_TIMEOUT_S - 3.0))
    if not outcome:
        raise ConfigError(f"--storage {storage}: no answer in {STORAGE_TIMEOUT_S:g} s. Is the network up, and are "
                          "the bucket's name and this machine's credentials right?")
    if outcome[0] is not None:
        raise ConfigError(f"--storage {storage}: cannot use it ({outcome[0]})")


def check_folder(flag: str, path: str, or_else: str = "", given: str | None = None) -> None:
    """A local folder the sweep will write to: it, or the nearest folder above it that exists, must
    be a folder this user may write in. Writes nothing. `given`: the flag's value as the user
    wrote it, where `path` is derived from it."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    given = path if given is None else given
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {given}: {folder} is a file; allowed: a folder (created if missing){or_else}")
    read_only_fs = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY
    if not os.access(folder, os.W_OK | os.X_OK) or read_only_fs:
        raise ConfigError(f"{flag} {given}: {folder} is read-only for this user; allowed: a folder this user can "
                          f"write to{or_else}")


def check_reports(reports: str, name: str) -> None:
    """--reports: a local folder where <name>/ and each report file can be written, checked before
    the sweep trains (the report is written at its end). Writes nothing."""
    from lsq import report, resume

    if "://" in reports:
        raise ConfigError(f"--reports {reports}: a URI; allowed: a local folder (--storage is the one that takes URIs)")
    folder = os.path.join(reports, name)
    check_folder("--reports", folder, given=reports)  # (<name>/ itself must not be a file)
    for file in report.FILES:
        if os.path.isdir(os.path.join(folder, file)):
            raise ConfigError(f"--reports {reports}: {os.path.join(folder, file)} is a folder, where the report writes "
                              "a file; allowed: a reports folder without it (remove it, or give another --reports)")


def create_storage(storage: str) -> None:
    """Create a local storage folder now, where a failure is one clear error: os.access says yes to
    root on NFS with root squashing and on /proc, and Tune's own attempt fails after Ray has started."""
    if "://" not in storage:
        try:
            os.makedirs(os.path.abspath(storage), exist_ok=True)  # ("" is the current folder)
        except OSError as e:
            raise ConfigError(f"--storage {storage}: cannot create it ({e.strerror or e}); allowed: a folder this user "
                              "can write to, or a URI such as s3://bucket/runs") from None


def _probe_storage(uri: str) -> str | None:
    """None where pyarrow reaches the storage at `uri`, else why not, in one line."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        fs.get_file_info(root)
    except Exception as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return None


# ----------------------------------------------------------------------------- Ray
def start_ray(args):
    """A private local Ray on 127.0.0.1 (default), or the cluster at --address."""
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"  # snapshot the experiment state after every step
    # A diverged trial's last report carries failed_reason, not top1/top5/loss: under early
    # stopping Tune's strict check would turn that report into an error that ends the whole sweep.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic progress table (CLIReporter)
    if not args.address:
        if os.environ.pop("RAY_ADDRESS", None):
            print("note: RAY_ADDRESS is set but ignored; pass --address to join a cluster", file=sys.stderr)
        # Read when Ray is imported: on Linux this keeps the node on 127.0.0.1 instead of every interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
            # Token authentication (Ray's default for a new local cluster) with a fresh token for
            # this cluster only: nothing read from or written to ~/.ray, no clash with other sweeps.
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    else:
        if "RAY_AUTH_MODE" not in os.environ and _token_available():
            # Ray turns token authentication on by itself only for address "auto"; an explicit
            # address (ray://, host:port) needs the mode set, or the token is never sent.
            os.environ["RAY_AUTH_MODE"] = "token"
        if _loopback_only(args.address):
            # Ray rewrites 127.0.0.1 to this machine's network address, where a cluster bound to
            # loopback (`ray start --head --node-ip-address 127.0.0.1`) does not answer: keep it.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import logging

    import ray

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    tune_log = logging.getLogger("ray.tune.tune")
    if _tune_stop_lines not in tune_log.filters:  # once, however often Ray is started
        tune_log.addFilter(_tune_stop_lines)
    quiet = ray.LoggingConfig(log_level="WARNING")
    with _ctrl_c_once_started(ray):
        if args.address:
            try:
                ray.init(address=args.address, logging_config=quiet)
            except Exception as e:
                raise ConfigError(
                    f"--address {args.address}: cannot join the Ray cluster ({type(e).__name__}: "
                    f"{str(e).strip()[:300]}). Start one with `ray start --head`; if it uses token authentication, "
                    "give this machine its token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)") from None
        else:
            with _lean_local_ray(args.dashboard):
                # Ray kills an idle worker after 1 s once fewer CPUs are free than workers are idle,
                # and Tune reserves each trial's CPUs (a placement group) a moment before it asks for
                # the worker: half the time that moment killed the workers Ray had just started, and
                # the trials waited for new ones. 10 s covers the gap.
                ctx = ray.init(address="local", include_dashboard=args.dashboard, logging_config=quiet,
                               _system_config={"idle_worker_killing_time_threshold_ms": 10_000})
            if args.dashboard and getattr(ctx, "dashboard_url", None):
                print(f"Ray dashboard: http://{ctx.dashboard_url}")
    return ray


@contextlib.contextmanager
def _ctrl_c_once_started(ray):
    """Hold a Ctrl-C that comes while Ray starts until it has started, then shut it down and
    interrupt. A KeyboardInterrupt raised inside `ray.init` lands in the middle of building its
    core worker, and the half-built worker crashed the interpreter at exit (status 139 instead of
    130) and left Ray's agents running for a minute. The wait is a few seconds at most; a second
    Ctrl-C interrupts at once. Where SIGINT is ignored (a background job), nothing changes."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt
        held.append(signum)
        print("\nstopping as soon as Ray has started (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        ray.shutdown()
        raise KeyboardInterrupt


def _tune_stop_lines(record) -> bool:
    """Tune's own lines at Ctrl-C end in advice to call `Tuner.restore(...)` from Python, which is
    not how a sweep resumes (sweep.py prints its resume command): one short line instead."""
    message = record.getMessage()
    if message.startswith("Stop signal received"):
        print("\nstopping: Tune saves the sweep's state (Ctrl-C again to skip that)", file=sys.stderr, flush=True)
        return False
    return not message.startswith("Experiment has been interrupted")


@contextlib.contextmanager
def _lean_local_ray(dashboard: bool):
    """Start the private Ray without the two head processes a one-machine sweep does not use,
    unless --dashboard asks for them.

    - The HTTP API server (dashboard.py: job submission, the state API behind `ray list`, and the
      dashboard when asked). Ray 2.60 starts it with every head node, `include_dashboard=False`
      included: about 1 s of `ray.init` on 2 cores, and an HTTP port open on 127.0.0.1.
    - The autoscaler's monitor: a one-machine cluster never scales. Tune reads the cluster's
      resources from Ray's control store (GCS), not from it.

    Each took about 1 CPU-second while the trial workers were starting on the same 2 cores.
    Patches Ray's `Node.start_api_server` and `Node.start_monitor` in this process for the length
    of `ray.init`; a Ray without them starts as it always does."""
    from ray._private import node

    skipped = [name for name in ("start_api_server", "start_monitor") if not dashboard and hasattr(node.Node, name)]
    originals = {name: node.Node.__dict__.get(name) for name in skipped}
    for name in skipped:
        setattr(node.Node, name, lambda self, **kwargs: None)
    try:
        yield
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(node.Node, name)
            else:
                setattr(node.Node, name, original)


HOST_MAX = 253  # a DNS name: at most 253 characters, each dot-separated part 1..63


def check_address(address: str) -> tuple[str, int] | None:
    """--address as written: auto, local, or HOST:PORT (ray://HOST:PORT) with a host name the
    resolver takes and a port of ASCII digits in 1..65535 (int() also reads '²' and '٣').
    Returns (host, port), None for auto and local. Connects to nothing."""
    if address in ("auto", "local"):
        return None
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    name = host.strip("[]")
    parts = name[:-1].split(".") if name.endswith(".") else name.split(".")  # (a final dot: a full name)
    if not (name and len(name) <= HOST_MAX and all(0 < len(p) <= 63 for p in parts)
            and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        shown = shlex.quote(address if len(address) <= 100 else address[:100] + "...")
        raise ConfigError(f"--address {shown}: expected auto, HOST:PORT or ray://HOST:PORT, with a host name of at "
                          f"most {HOST_MAX} characters (dot-separated parts of 1..63) and a port in 1..65535")
    return host, int(port)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a wrong host:port (Ray itself retries for many minutes)."""
    target = check_address(address)
    if target is None:
        return
    host, port = target
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
    except UnicodeError as e:  # a host name the resolver cannot encode (IDNA), e.g. a character it prohibits
        raise ConfigError(f"--address {address}: host {host!r} is not a host name ({e}); allowed: auto, HOST:PORT "
                          "or ray://HOST:PORT") from None
    except OSError as e:
        raise ConfigError(f"--address {address}: nothing answers at {host}:{port} ({e.strerror or e}). "
                          "Is the cluster up (`ray start --head` prints its address)?") from None


def _loopback_only(address: str) -> bool:
    """A cluster at 127.0.0.1:PORT that does not also listen on this machine's network address."""
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # picks the outgoing interface; sends nothing
            own = s.getsockname()[0]
        socket.create_connection((own, int(port)), timeout=2).close()
        return own.startswith("127.")
    except OSError:
        return True


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)


def fit_resources(ray, resources: dict, space: Space, local: bool) -> dict:
    """Per-trial resources that this cluster can give: CPU-only without GPUs, capped locally."""
    cluster = ray.cluster_resources()
    return fit_to(cluster.get("CPU", 0), cluster.get("GPU", 0), resources, space, local)


def fit_to(cpus: float, gpus: float, resources: dict, space: Space, local: bool) -> dict:
    """fit_resources for a cluster of `cpus` CPUs and `gpus` GPUs (the dry run: this machine's)."""
    from lsq import report, resume

    res = dict(resources)
    if not gpus and any(t.device == "cuda" for t in space.trials):  # whatever gpu the trials ask for
        raise ConfigError("key 'device' = 'cuda' but the cluster has no GPU; allowed here: auto, cpu "
                          "(e.g. --set device=auto)")
    if res["gpu"] and not gpus:
        print(f"note: the cluster has no GPU: running CPU-only (asked for gpu={res['gpu']} per trial)")
        res["gpu"] = 0
    elif res["gpu"] > gpus:
        raise ConfigError(f"resources: gpu={res['gpu']} per trial, but the cluster has {report.count(int(gpus), 'GPU')}; "
                          f"allowed: at most {gpus:g} (resources.gpu in the space, or --gpus-per-trial)")
    if local and res["cpu"] > cpus:
        print(f"note: this machine has {report.count(int(cpus), 'CPU')}: each trial gets {cpus:g} "
              f"(asked for {res['cpu']})")
        res["cpu"] = cpus
    return res


# ----------------------------------------------------------------------------- the sweep
def whole_file_snapshots() -> bool:
    """Make Tune's copies of its experiment snapshot into a local (or NFS) folder whole or absent.

    After every controller step Tune writes the experiment state into a staging folder and copies
    that folder (after a resume: every *.json and *.pkl of the experiment's top level, older
    sessions' too) to storage, each file written in place. A driver killed during the copy leaves
    the files it was writing cut short (0 bytes), and the next --resume fails on them. Tune also
    rewrites the staging state in place while the previous copy may still read it. Here each file
    is read whole, checked (`report.whole_snapshot_file`: a state caught mid-rewrite is skipped and
    its last whole copy stays), written to a hidden temporary name beside its target and renamed
    over it. Object stores (s3://, gs://) replace whole objects already and keep Tune's copy.
    Patches Ray 2.60's `_upload_to_fs_path` in this (the driver's) process; with another Ray that
    lacks it, nothing is patched and `report.recover_snapshot` still repairs at resume."""
    import pyarrow.fs as pafs
    from ray.train._internal import storage as ray_storage

    from lsq.storage import whole_snapshot_file

    upload = getattr(ray_storage, "_upload_to_fs_path", None)
    if upload is None or getattr(upload, "whole_files", False):
        return upload is not None

    def whole_file_upload(local_path, fs, fs_path, exclude=None):
        if exclude or not isinstance(fs, pafs.LocalFileSystem) or not os.path.isdir(local_path):
            return upload(local_path=local_path, fs=fs, fs_path=fs_path, exclude=exclude)
        for root, _, files in os.walk(local_path):
            target = os.path.normpath(os.path.join(fs_path, os.path.relpath(root, local_path)))
            os.makedirs(target, exist_ok=True)
            for name in files:
                if name.startswith("."):
                    continue  # Tune's own temporaries (its searcher state is saved atomically)
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue  # replaced or removed since the listing
                if not whole_snapshot_file(name, data):
                    continue  # Tune is rewriting it right now: the next copy takes it
                tmp = os.path.join(target, f".{name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, os.path.join(target, name))

    whole_file_upload.whole_files = True
    ray_storage._upload_to_fs_path = whole_file_upload
    return True


def results_survive_a_restart() -> bool:
    """Keep a restarted trial's result.json (and progress.csv) whole.

    Tune's loggers write each result into the driver's staging folder, which a background copy
    takes to storage after the controller step. When a trial restarts (its worker died, it raised),
    the loggers first copy the file back from storage over the staging one. If the last copy had
    not finished, or had been skipped because the one before was still running (a loaded machine,
    slow storage), that overwrites the newest lines with an older file: the restarted trial's
    history lost the epochs it reported just before it failed ([2, 3] instead of [1, 2, 3]), in
    storage too once the next copy ran. The copy back is needed only by a new driver, whose
    staging folder starts empty; a file this driver has in staging is its newest. So the copy back
    now happens only where staging has no such file. Patches Ray 2.60's
    `LoggerCallback._restore_from_remote` in this (the driver's) process; with another Ray that
    lacks it, nothing changes."""
    from ray.tune.logger import logger as tune_logger

    cls = getattr(tune_logger, "LoggerCallback", None)
    restore = getattr(cls, "_restore_from_remote", None)
    if restore is None or hasattr(restore, "unpatched"):
        return restore is not None

    def restore_unless_staged(self, file_name, trial):
        if os.path.exists(os.path.join(trial.local_path, file_name)):
            return  # written by this driver: at least as new as the copy in storage
        restore(self, file_name, trial)

    restore_unless_staged.unpatched = restore
    cls._restore_from_remote = restore_unless_staged
    return True


class RestoreFailed(BaseException):
    """Tune's controller could not restore the stored run state (see resume_or_stop)."""


def resume_or_stop() -> bool:
    """A resume whose run state Tune cannot restore stops, where Tune would start the sweep again.

    Ray 2.60's TuneController catches any exception from its `resume` (a snapshot it cannot read:
    trials it cannot rebuild from the experiment state, storage that moved) and, unless every
    trial is run fail-fast, logs "Failed to restore the run state" and starts the experiment from
    scratch: every trial from epoch 0, its stored results and checkpoints taken over by the new
    run. Here `resume` raises RestoreFailed instead, a BaseException that the catch-all lets
    through, and run_sweep turns it into one error. Patches `TuneController.resume` in this (the
    driver's) process; with another Ray that lacks it, nothing changes."""
    try:
        from ray.tune.execution.tune_controller import TuneController
    except ImportError:
        return False
    resume = getattr(TuneController, "resume", None)
    if resume is None or hasattr(resume, "unpatched"):
        return resume is not None

    def resume_or_raise(self, *args, **kwargs):
        try:
            return resume(self, *args, **kwargs)
        except Exception as e:
            raise RestoreFailed(e) from e

    resume_or_raise.unpatched = resume
    TuneController.resume = resume_or_raise
    return True


def trials_in_prestarted_workers() -> bool:
    """Let the trials run in the Python workers Ray starts with the node, not in new ones.

    Ray starts one idle worker per CPU as its node comes up, but a worker only serves tasks whose
    runtime env matches its own (empty) one, and Tune gives every trainable the runtime env
    {"env_vars": {"PL_DISABLE_FORK": "1"}} (a PyTorch Lightning setting; this project does not use
    Lightning). So each trial waited for a fresh process while the prestarted ones were killed
    unused, having cost 1-2 CPU-seconds of a busy start. Dropping that one default makes the
    runtime env empty (unless one of the variables Tune forwards, such as AWS keys, is set: then
    it forwards them as before). Patches Ray 2.60's `class_cache.DEFAULT_ENV_VARS` in this (the
    driver's) process; with another Ray that lacks it, nothing changes."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:
        return False
    defaults = getattr(class_cache, "DEFAULT_ENV_VARS", None)
    if not isinstance(defaults, dict):
        return False
    defaults.pop("PL_DISABLE_FORK", None)
    return not defaults


def run_sweep(args, argv, space: Space, name: str, storage: str, experiment: str, resources: dict,
              max_failures: int, stored: dict | None = None) -> int:
    """Run (or, given `stored`, the sweep.json of the sweep being resumed, resume) the Tuner and
    write the report; the exit status."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from lsq import report, resume
    from lsq.trainable import NoTensorBoard, train_lsq

    whole_file_snapshots()
    results_survive_a_restart()
    resume_or_stop()
    trials_in_prestarted_workers()
    trainable = tune.with_resources(train_lsq, {"cpu": resources["cpu"], "gpu": resources["gpu"]})
    if args.resume:
        print(f"Resuming sweep '{name}' from {experiment}")
        _resume_notes(args, space, experiment, stored or {})
        try:  # Tune unpickles tuner.pkl here: a file that is whole (see recover_snapshot) but not a Tuner's state
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                       restart_errored=False)
        except Exception as e:
            if args.debug:
                raise
            raise ConfigError(f"--resume: cannot restore sweep '{name}' from {_join(experiment, 'tuner.pkl')} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); allowed: the tuner.pkl Tune "
                              f"wrote for this sweep (restore it, or start again with --name {name}-2)") from None
    else:
        points = space.points()
        varied = space.varied_keys()
        # Tune needs every key of a preset point in the search space: constants, and a choice for
        # the keys that vary. Each trial's config is then exactly one point: a plain TrialConfig dict.
        param_space = {k: (tune.choice(_unique([p[k] for p in points])) if k in varied else points[0][k])
                       for k in points[0]}
        scheduler = None
        if space.early_stopping:
            from ray.tune.schedulers import ASHAScheduler

            es = space.early_stopping
            scheduler = ASHAScheduler(time_attr="training_iteration", metric=es["metric"], mode=es["mode"],
                                      max_t=max(t.epochs for t in space.trials), grace_period=es["grace_period"],
                                      reduction_factor=es["reduction_factor"])
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                # The limit goes to the generator itself: Tune applies max_concurrent_trials only to
                # a Searcher, and ignores it (with a log line) for a generator like this one.
                search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=args.max_concurrent or 0),
                num_samples=len(points),
                scheduler=scheduler,
                reuse_actors=True,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                callbacks=[] if args.tensorboard else [NoTensorBoard()],
                name=name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
                progress_reporter=_progress_reporter(tune, varied),
                verbose=1,
            ),
        )
        report.write_meta(experiment, {
            "name": name, "description": space.description, "space": os.path.abspath(space.path),
            "trials": len(space.trials), "cells": space.cells, "seeds": space.seeds,
            "merged": [m.describe(space.trials[m.kept]) for m in space.merged],
            "resources": resources, "max_failures": max_failures, "max_concurrent": args.max_concurrent,
            "tensorboard": args.tensorboard, "early_stopping": space.early_stopping,
            "overrides": space.overrides, "command": resume_command(argv, resume=False),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        })
        print(f"Sweep '{name}': {report.count(len(space.trials), 'trial')}, each {_res_text(resources)}; storage {experiment}")

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C while Tune was saving its state
        pass
    except RestoreFailed as e:
        cause = e.__cause__
        if args.debug:
            raise cause from None
        session, _ = report.usable_session(report.Storage(experiment))  # the one Tune read (recover_snapshot set newer ones aside)
        state = f"experiment_state-{session}.json" if session else "experiment_state-*.json"
        raise ConfigError(f"--resume: Tune cannot restore sweep '{name}' from {_join(experiment, state)} "
                          f"({type(cause).__name__}: {' '.join(str(cause).split())[:300]}); nothing was run again. "
                          f"Allowed: the experiment state Tune wrote for this sweep (restore it, or start again "
                          f"with --name {name}-2)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)

    unreported = False
    try:
        result = report.build_report(experiment, args.reports, name, live=False)  # fit() has returned: nothing runs
        _print_report(result)
        statuses = result.results["status"]
    except OSError as e:  # the reports folder changed during the sweep, the disk is full, the storage went away
        unreported = True
        print(f"error: cannot build the report in {os.path.join(args.reports, name)} ({e.strerror or e}). The "
              f"sweep's results stay in {experiment}: the same command with --report-only (and --reports DIR "
              "for another folder) builds it again", file=sys.stderr)
        try:
            statuses = report.collect(experiment, live=False)[0]["status"]
        except Exception:
            return 1
    if statuses.isin(["INTERRUPTED", "PENDING"]).any():
        print(f"\nThe sweep was interrupted. Resume it with:\n  {resume_command(argv)}")
        return 130
    return 1 if unreported or (statuses == "ERROR").any() else 0


def _trial_name(trial) -> str:
    """Tune trial (and folder) name: the cell number in the space and its label."""
    return trial_name(trial.config, int(trial.trial_id.rsplit("_", 1)[-1]) + 1)


HEARTBEAT_S = 120.0


def _progress_reporter(tune, varied: list[str]):
    """A compact progress table (trial, status, epoch, top-1), printed when something changed; while
    nothing does (a long epoch), one line every HEARTBEAT_S that says the sweep is still at work."""
    shown_in_name = ("w_bits", "a_bits", "first", "last")
    params = [k for k in varied if k not in shown_in_name]

    class Progress(tune.ProgressReporter):
        def __init__(self):
            self._last, self._last_time, self._changed, self._start = None, 0.0, 0.0, time.time()

        def setup(self, start_time=None, *args, **kwargs):
            self._start = start_time or self._start

        def should_report(self, trials, done=False):
            state = [(t.trial_id, t.status, t.last_result.get("epoch")) for t in trials]
            now = time.time()
            if done or (state != self._last and now - self._last_time >= 5) or now - self._last_time >= HEARTBEAT_S:
                if state != self._last:
                    self._changed = now
                self._last, self._last_time = state, now
                return True
            return False

        def report(self, trials, done, *sys_info):
            counts = {}
            for t in trials:
                counts[t.status] = counts.get(t.status, 0) + 1
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - self._start))
            if not done and self._changed < self._last_time:  # the heartbeat: nothing new since the table
                quiet = time.strftime("%H:%M:%S", time.gmtime(self._last_time - self._changed))
                print(f"[{elapsed}] " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                      + f": training, no epoch finished in the last {quiet}", flush=True)
                return
            rows = [["trial", "status", "epoch", "top-1", "best"] + params]
            for t in sorted(trials, key=lambda t: t.trial_id):
                r, c = t.last_result or {}, t.config
                epoch = f"{r['epoch']}/{c.get('epochs')}" if "epoch" in r else ""
                rows.append([str(t), t.status, epoch, _pct(r.get("top1")), _pct(r.get("best_top1"))]
                            + [str(c.get(k)) for k in params])
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            lines = [f"[{elapsed}] " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
            lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
            print("\n".join(lines) + "\n", flush=True)

    return Progress()


def _pct(x) -> str:
    return "" if x is None else f"{x:.2f}"


def _interrupted_text(args, argv: list[str]) -> str:
    """What to do after Ctrl-C: resume a sweep Tune has stored, or start again one it has not."""
    experiment = getattr(args, "experiment", None)
    if args.report_only or args.dry_run:
        return "\ninterrupted."
    try:
        from lsq import report, resume

        stored = experiment is not None and (args.resume or report.experiment_exists(experiment))
    except Exception:  # storage unreachable: the resume command is the safer advice
        stored = True
    if stored:
        return f"\ninterrupted. Resume with:\n  {resume_command(argv)}"
    return f"\ninterrupted before the sweep started (nothing to resume). Start it again with:\n  " \
           f"{resume_command(argv, resume=False)}"


def _sigterm_as_ctrl_c(signum, frame):
    """SIGTERM (e.g. from a batch scheduler) stops the sweep the way Ctrl-C does."""
    signal.raise_signal(signal.SIGINT)


def _resume_notes(args, space: Space, experiment: str, stored: dict) -> None:
    """What a resume will not take from this command line: a changed space, changed flags."""
    _warn_if_space_changed(space, experiment, stored)
    ignored = _ignored_on_resume(args, stored)
    if ignored:
        print(f"note: a resumed sweep keeps the settings it started with; ignored: {'; '.join(ignored)}")


def check_stored(stored: dict, experiment: str, name: str) -> dict:
    """The sweep.json a resume keeps its resources, retries, concurrency and early stopping from,
    as the sweep wrote it: a hand-edited value fails here, naming the file and the key, not inside
    Tune. Keys it lacks (an older sweep) are fine."""
    from lsq import report, resume
    from lsq.space import _early_stopping, check_resource

    where = f"--resume: {_join(experiment, report.SWEEP_FILE)}"

    def bad(key: str, allowed: str):
        return ConfigError(f"{where}: key '{key}' = {stored[key]!r}; allowed: {allowed}, as the sweep wrote it "
                           f"(restore the file, or start again with --name {name}-2)")

    res = stored.get("resources")
    if res is not None:
        if not isinstance(res, dict) or set(res) != {"cpu", "gpu"}:
            raise bad("resources", "a mapping of cpu and gpu")
        for key, value in res.items():
            try:
                check_resource(key, value, where)
            except ConfigError:
                raise bad("resources", f"{key} as a trial's resources allow") from None
    count = lambda v, least: isinstance(v, int) and not isinstance(v, bool) and v >= least  # noqa: E731
    if "max_failures" in stored and not count(stored["max_failures"], 0):
        raise bad("max_failures", "a whole number >= 0")
    if stored.get("max_concurrent") is not None and not count(stored["max_concurrent"], 1):
        raise bad("max_concurrent", "null or a whole number >= 1")
    if stored.get("early_stopping") is not None:
        try:
            _early_stopping(stored["early_stopping"], lambda *keys: where)
        except ConfigError:
            raise bad("early_stopping", "null or the space's early_stopping section") from None
    return stored


def _ignored_on_resume(args, stored: dict) -> list[str]:
    """The flags given with --resume that differ from what the sweep started with, each with the
    value it keeps: Tune restores resources, retries, the concurrency limit and the loggers with
    the sweep. Flags equal to the stored values (as in the printed resume command) say nothing."""
    unknown = object()  # a sweep.json from before the key was recorded
    res = stored.get("resources") or {}
    limit = stored.get("max_concurrent", None)  # before it was recorded, no limit ever applied
    # Resources are kept only where sweep.json has them (see run); without, the flags do apply.
    flags = [("--cpus-per-trial", args.cpus_per_trial if res else None, res.get("cpu", unknown)),
             ("--gpus-per-trial", args.gpus_per_trial if res else None, res.get("gpu", unknown)),
             ("--max-failures", args.max_failures, stored.get("max_failures", unknown)),
             ("--max-concurrent", args.max_concurrent, limit)]
    out = []
    for flag, given, kept in flags:
        if given is None or (kept is not unknown and kept is not None and float(given) == float(kept)):
            continue
        was = "as it started" if kept is unknown else ("no limit" if kept is None else f"{kept:g}")
        out.append(f"{flag} {given:g} (keeps {was})")
    if args.tensorboard and stored.get("tensorboard") is not True:
        out.append("--tensorboard (keeps " + ("no TensorBoard files" if "tensorboard" in stored else "its loggers")
                   + ")")
    return out


def _warn_if_space_changed(space: Space, experiment: str, stored: dict | None = None) -> None:
    """Tune resumes the trials it stored, with the configs they started with: say so when the
    space (its file, or --set) now asks for other trials or other values, e.g. more epochs.
    `stored`: the sweep's sweep.json, if the caller has read it already."""
    from lsq import report, resume
    from lsq.config import TrialConfig

    name = os.path.basename(experiment.rstrip("/"))
    way_out = f"--resume continues the stored trials as they started (a new sweep: --name {name}-2)"
    created = (report.read_meta(experiment) if stored is None else stored).get("trials")
    if created not in (None, len(space.trials)):
        print(f"note: the space now has {report.count(len(space.trials), 'trial')}, the stored sweep {created}: {way_out}")
        return
    # Trial i runs point i. Tune may not have created every trial yet (--max-concurrent, a large
    # grid): it creates those on resume from the points it stored, so only created ones compare.
    now = space.points()
    pairs = [(c, now[i]) for i, c in sorted(report.stored_configs(experiment).items()) if i < len(now)]
    changed = []
    for key in TrialConfig.keys():
        differ = [(old[key], new[key]) for old, new in pairs if repr(old[key]) != repr(new[key])]
        if differ:
            changed.append(f"{key} {_values(_unique([o for o, _ in differ]))} -> {_values(_unique([n for _, n in differ]))}")
    if changed:
        print(f"note: the space now differs from the stored sweep ({'; '.join(changed)}): {way_out}")


def _values(values: list) -> str:
    """One key's values across the trials: `8`, or `{0.05, 0.001}`."""
    text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return text if len(values) == 1 else "{" + text + "}"


# ----------------------------------------------------------------------------- text
def dry_run_text(space: Space, name: str, resources: dict, max_failures: int, experiment: str, args) -> str:
    from lsq import report, resume

    scheduler = "FIFO: every trial runs to its last epoch"
    if space.early_stopping:
        es = space.early_stopping
        scheduler = (f"ASHA on {es['metric']} ({es['mode']}), grace period {report.count(es['grace_period'], 'epoch')}, "
                     f"reduction factor {es['reduction_factor']}")
    cpus, gpus = os.cpu_count() or 1, None if args.address else local_gpus()
    if gpus is not None:  # what the real run's private Ray will find: its notes and errors, here too
        resources = fit_to(cpus, gpus, resources, space, local=True)
    at_once = max(1, int(cpus // max(resources["cpu"], 1e-9)))
    if resources["gpu"] and gpus:
        at_once = min(at_once, max(1, int(gpus // resources["gpu"])))
    if args.max_concurrent:
        at_once = min(at_once, args.max_concurrent)
    machine = report.count(cpus, "CPU") + (f", {report.count(int(gpus), 'GPU')}" if gpus else "")
    lines = [f"Sweep '{name}' from {space.path}: {report.count(len(space.trials), 'trial')}"
             + (f" ({space.cells} cells, {space.cells - len(space.trials)} merged)" if space.cells != len(space.trials) else ""),
             ""]
    if space.description:
        lines += [space.description, ""]
    lines += [format_table(space), "",
              f"resources per trial: {_res_text(resources)}"
              + ("" if args.address else f"; on this machine ({machine}) up to {at_once} at once"),
              f"scheduler: {scheduler}; a crashed trial is retried {_times(max_failures)} from its last checkpoint",
              f"storage: {experiment}",
              f"reports: {os.path.join(args.reports, name)}",
              "dry run: nothing was started or written"]
    return "\n".join(lines)


def local_gpus() -> int | None:
    """The GPUs a private Ray would give trials on this machine, counted as `ray.init` counts
    them (CUDA_VISIBLE_DEVICES included), or None where Ray cannot say."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # as start_ray sets it: read when Ray is imported
    try:
        from ray._private import accelerators

        manager = accelerators.get_accelerator_manager_for_resource("GPU")
        n = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        return int(min(n, len(visible)) if visible is not None else n)
    except Exception:  # another Ray, an odd driver: the dry run shows the resources as asked
        return None


def _print_report(result) -> None:
    print(f"\nReport: {result.folder}  ({', '.join(os.path.basename(f) for f in result.files)})\n")
    print(result.table_md)


def _times(n: int) -> str:
    return "never" if n == 0 else "once" if n == 1 else f"up to {n} times"


def _res_text(resources: dict) -> str:
    def n(x, noun: str) -> str:  # 0.5 CPU, 1 CPU, 2 CPUs
        return f"{x:g} {noun}{'s' if x > 1 else ''}"

    return n(resources["cpu"], "CPU") + (f", {n(resources['gpu'], 'GPU')}" if resources["gpu"] else "")


def resume_command(argv: list[str], resume: bool = True) -> str:
    """The exact command that continues this sweep."""
    script = sys.argv[0] if os.path.basename(sys.argv[0]) == "sweep.py" else os.path.relpath(__file__)
    args = [a for a in argv if a not in ("--resume", "--dry-run", "--report-only")]
    return shlex.join(["python", script, *args] + (["--resume"] if resume else []))


def _space_path(given: str | None) -> str:
    """The space file: as given, else (a relative path that is not here) under the project, as
    `search_spaces/x.yaml` means from any folder; none given: the default space."""
    given = given or DEFAULT_SPACE
    if not os.path.exists(given) and not os.path.isabs(given) and os.path.exists(os.path.join(HERE, given)):
        return os.path.join(HERE, given)
    return given


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else os.path.join(storage, name)


def _unique(values: list) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
