"""Every workaround of Ray internals, in one place, each written for Ray 2.60.

Each patches the driver's process only, says what Ray does without it, and does nothing on a Ray
that lacks what it patches. tests/test_sweep.py has a test that fails without each.
"""

import contextlib
import os
import signal
import sys
import threading

from .storage import whole_snapshot_file

# Ray kills an idle worker 1 s after fewer CPUs are free than workers idle, and Tune reserves a
# trial's CPUs a moment before it asks for the worker: that moment killed the workers Ray had just
# started, and trials waited for new ones. 10 s covers the gap.
KEEP_IDLE_WORKERS = {"idle_worker_killing_time_threshold_ms": 10_000}


def loopback_node() -> None:
    """Without it, Ray on Linux binds its node to every interface; read when Ray is imported."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def whole_file_snapshots() -> bool:
    """Tune copies its snapshot to local storage in place: a driver killed mid-copy leaves files
    cut short, and --resume fails on them. Each file is now written whole, then renamed over."""
    import pyarrow.fs as pafs
    from ray.train._internal import storage as ray_storage

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
                    continue  # Tune's own temporaries
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue  # replaced since the listing
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
    """A restarted trial's loggers copy result.json back from storage over the driver's newer
    copy, losing the last epochs it reported. Only a new driver (empty staging) needs that copy."""
    from ray.tune.logger import logger as tune_logger

    cls = getattr(tune_logger, "LoggerCallback", None)
    restore = getattr(cls, "_restore_from_remote", None)
    if restore is None or hasattr(restore, "unpatched"):
        return restore is not None

    def restore_unless_staged(self, file_name, trial):
        if not os.path.exists(os.path.join(trial.local_path, file_name)):
            restore(self, file_name, trial)

    restore_unless_staged.unpatched = restore
    cls._restore_from_remote = restore_unless_staged
    return True


class RestoreFailed(BaseException):
    """Tune's controller could not restore the stored run state (see resume_or_stop)."""


def resume_or_stop() -> bool:
    """Tune's controller catches any error of `resume` and starts the sweep again from epoch 0
    over its stored results. RestoreFailed, a BaseException, passes its catch-all instead."""
    from ray.tune.execution.tune_controller import TuneController

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
    """Tune gives every trainable the runtime env PL_DISABLE_FORK=1 (for Lightning), so no trial
    could run in the workers Ray prestarts with an empty one: each waited for a new process."""
    from ray.tune.execution import class_cache

    defaults = getattr(class_cache, "DEFAULT_ENV_VARS", None)
    if not isinstance(defaults, dict):
        return False
    defaults.pop("PL_DISABLE_FORK", None)
    return not defaults


def patch_tune() -> None:
    whole_file_snapshots()
    results_survive_a_restart()
    resume_or_stop()
    trials_in_prestarted_workers()


@contextlib.contextmanager
def lean_local_ray(dashboard: bool):
    """Ray starts its HTTP API server (an open port) and the autoscaler's monitor with every head
    node: about 1 CPU-second each that a one-machine sweep never uses, unless --dashboard."""
    from ray._private import node

    skipped = [n for n in ("start_api_server", "start_monitor") if not dashboard and hasattr(node.Node, n)]
    originals = {n: getattr(node.Node, n) for n in skipped}
    for n in skipped:
        setattr(node.Node, n, lambda self, **kwargs: None)
    try:
        yield
    finally:
        for n, original in originals.items():
            setattr(node.Node, n, original)


@contextlib.contextmanager
def ctrl_c_once_started(ray):
    """A Ctrl-C inside `ray.init` leaves a half-built core worker that crashes the exit (status
    139) and Ray's agents running: it is held until Ray has started; a second one acts at once."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt
        held.append(signum)
        print(
            "\nstopping as soon as Ray has started (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        ray.shutdown()
        raise KeyboardInterrupt


def no_tensorboard():
    """Tune adds its TensorBoard logger to every run, importing torch in the driver (3-4 s)."""
    from ray.tune.logger import TBXLoggerCallback

    class NoTensorBoard(TBXLoggerCallback):
        def __init__(self):  # TBXLoggerCallback's imports tensorboardX
            pass

        def log_trial_start(self, trial):
            pass

        def log_trial_result(self, iteration, trial, result):
            pass

        def log_trial_end(self, trial, failed=False):
            pass

    return NoTensorBoard()
