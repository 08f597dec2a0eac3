"""The sweep itself: a plan, the Tuner that runs it with Tune's progress table, and the report."""

import dataclasses
import logging
import os
import signal
import sys
import time

from . import ray_fixes
from .cli import FAILED, INTERRUPTED, OK
from .config import ConfigError
from .resume import resume_command
from .space import Space, format_table, trial_name

CHECKPOINTS_TO_KEEP = 2
REPORT_S = 30  # seconds between progress tables


@dataclasses.dataclass
class Plan:
    """Everything a sweep run needs, validated before Ray starts."""

    space: Space
    name: str
    storage: str  # an absolute local path or a URI
    experiment: str  # storage/name
    resources: dict
    max_failures: int
    argv: list[str]
    reports: str = "reports"
    max_concurrent: int | None = None
    resume: bool = False
    stored: dict | None = None  # the resumed sweep's sweep.json
    address: str | None = None
    tensorboard: bool = False
    debug: bool = False


def run_sweep(plan: Plan) -> int:
    """Run (or resume) the Tuner, write the report, and return the exit status."""
    from ray import tune

    from . import report, storage
    from .trainable import train_lsq

    ray_fixes.patch_tune()
    tune_log = logging.getLogger("ray.tune.tune")
    if tune_stop_lines not in tune_log.filters:
        tune_log.addFilter(tune_stop_lines)
    trainable = tune.with_resources(train_lsq, {"cpu": plan.resources["cpu"], "gpu": plan.resources["gpu"]})
    if plan.resume:
        tuner_pkl = join(plan.experiment, "tuner.pkl")
        try:  # Tune unpickles tuner.pkl here: whole (see recover_snapshot) but maybe not a Tuner's state
            tuner = tune.Tuner.restore(
                plan.experiment, trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
            )
        except Exception as e:
            if plan.debug:
                raise
            raise ConfigError(
                f"--resume: cannot restore sweep '{plan.name}' from {tuner_pkl} ({one_line(e)}); "
                f"allowed: the tuner.pkl Tune wrote for this sweep (restore it, or start again with "
                f"--name {plan.name}-2)"
            ) from None
    else:
        tuner = new_tuner(plan, trainable)
        storage.write_meta(plan.experiment, record(plan))
        print(
            f"Sweep '{plan.name}': {report.count(len(plan.space.trials), 'trial')}, each "
            f"{resources_text(plan.resources)}; storage {plan.experiment}"
        )

    previous = signal.getsignal(signal.SIGTERM)  # a batch scheduler's stop ends the sweep as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C while Tune was saving its state
        pass
    except ray_fixes.RestoreFailed as e:
        if plan.debug:
            raise e.__cause__ from None
        session, _ = storage.usable_session(storage.Storage(plan.experiment))
        state = f"experiment_state-{session}.json" if session else "experiment_state-*.json"
        raise ConfigError(
            f"--resume: Tune cannot restore sweep '{plan.name}' from {join(plan.experiment, state)} "
            f"({one_line(e.__cause__)}); nothing was run again. Allowed: the experiment state Tune "
            f"wrote for this sweep (restore it, or start again with --name {plan.name}-2)"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return finish(plan)


def new_tuner(plan: Plan, trainable):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space, points, varied = plan.space, plan.space.points(), plan.space.varied_keys()
    # Tune needs every key of a preset point in its search space: constants, and a choice for the
    # keys that vary. Each trial's config is then exactly one point: a plain TrialConfig dict.
    param_space = {
        k: tune.choice(list(dict.fromkeys(p[k] for p in points))) if k in varied else points[0][k]
        for k in points[0]
    }
    scheduler = None
    if space.early_stopping:
        from ray.tune.schedulers import ASHAScheduler

        es = space.early_stopping
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric=es["metric"],
            mode=es["mode"],
            max_t=max(t.epochs for t in space.trials),
            grace_period=es["grace_period"],
            reduction_factor=es["reduction_factor"],
        )

    def name_trial(trial) -> str:  # the cell's number in the space and its label
        return trial_name(trial.config, int(trial.trial_id.rsplit("_", 1)[-1]) + 1)

    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            # Tune applies max_concurrent_trials only to a Searcher: the generator gets the limit itself
            search_alg=BasicVariantGenerator(
                points_to_evaluate=points, max_concurrent=plan.max_concurrent or 0
            ),
            num_samples=len(points),
            scheduler=scheduler,
            reuse_actors=True,
            trial_name_creator=name_trial,
            trial_dirname_creator=name_trial,
        ),
        run_config=tune.RunConfig(
            callbacks=[] if plan.tensorboard else [ray_fixes.no_tensorboard()],
            name=plan.name,
            storage_path=plan.storage,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            progress_reporter=progress_reporter(varied),
        ),
    )


def record(plan: Plan) -> dict:
    """sweep.json: what a resume keeps, and what the report says of the sweep."""
    space = plan.space
    meta = {
        key: getattr(plan, key)
        for key in ("name", "resources", "max_failures", "max_concurrent", "tensorboard")
    }
    meta |= {
        key: getattr(space, key) for key in ("description", "cells", "seeds", "early_stopping", "overrides")
    }
    meta["merged"] = [m.describe(space.trials[m.kept]) for m in space.merged]
    meta["command"] = resume_command(plan.argv, resume=False)
    meta["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return meta | {"space": os.path.abspath(space.path), "trials": len(space.trials)}


def finish(plan: Plan) -> int:
    """Write the report once Tune has returned; the exit status from the trials' statuses."""
    from . import report

    try:
        result = report.build_report(plan.experiment, plan.reports, plan.name, live=False)
    except OSError as e:  # the disk is full, the storage went away
        folder = os.path.join(plan.reports, plan.name)
        print(
            f"error: cannot build the report in {folder} ({e.strerror or e}). The sweep's results stay in "
            f"{plan.experiment}: the same command with --report-only builds it again",
            file=sys.stderr,
        )
        return FAILED
    print_report(result)
    statuses = result.results["status"]
    if statuses.isin(["INTERRUPTED", "PENDING"]).any():
        print(f"\nThe sweep was interrupted. Resume it with:\n  {resume_command(plan.argv)}")
        return INTERRUPTED
    return FAILED if (statuses == "ERROR").any() else OK


def print_report(result) -> None:
    print(f"\nReport: {result.folder}  ({', '.join(os.path.basename(f) for f in result.files)})\n")
    print(result.table_md)


def tune_stop_lines(record) -> bool:
    """Tune's lines at Ctrl-C advise `Tuner.restore(...)` from Python; the sweep prints its own
    resume command, so they become one short line."""
    message = record.getMessage()
    if message.startswith("Stop signal received"):
        print("\nstopping: Tune saves the sweep's state (Ctrl-C again to skip that)", file=sys.stderr)
        return False
    return not message.startswith("Experiment has been interrupted")


def progress_reporter(varied: list[str]):
    """Tune's table, every REPORT_S: trial, status, epoch, top-1, and the keys that vary."""
    from ray.tune import CLIReporter

    params = [k for k in varied if k not in ("w_bits", "a_bits", "first", "last")]  # those are in the name
    columns = {"epoch": "epoch", "top1": "top-1", "best_top1": "best"}
    return CLIReporter(metric_columns=columns, parameter_columns=params, max_report_frequency=REPORT_S)


def dry_run_text(plan: Plan, gpus: int | None) -> str:
    """What a run would do: the trials, their resources on this machine, scheduler, storage, reports."""
    from .cluster import fit_to
    from .report import count

    space, resources, cpus = plan.space, plan.resources, os.cpu_count() or 1
    if gpus is not None:  # what the real run's private Ray will find: its notes and errors, here too
        resources = fit_to(cpus, gpus, resources, space, local=True)
    at_once = [cpus // max(resources["cpu"], 1e-9), plan.max_concurrent or cpus]
    if resources["gpu"] and gpus:
        at_once.append(gpus // resources["gpu"])
    machine = count(cpus, "CPU") + (f", {count(int(gpus), 'GPU')}" if gpus else "")
    here = "" if plan.address else f"; on this machine ({machine}) up to {max(1, int(min(at_once)))} at once"
    scheduler = "FIFO: every trial runs to its last epoch"
    if es := space.early_stopping:
        scheduler = (
            f"ASHA on {es['metric']} ({es['mode']}), grace period {count(es['grace_period'], 'epoch')}"
        )
        scheduler += f", reduction factor {es['reduction_factor']}"
    retries = {0: "never", 1: "once"}.get(plan.max_failures, f"up to {plan.max_failures} times")
    merged = space.cells - len(space.trials)
    title = f"Sweep '{plan.name}' from {space.path}: {count(len(space.trials), 'trial')}"
    lines = [title + (f" ({space.cells} cells, {merged} merged)" if merged else ""), ""]
    lines += [space.description, ""] if space.description else []
    lines += [format_table(space), "", f"resources per trial: {resources_text(resources)}{here}"]
    lines += [f"scheduler: {scheduler}; a crashed trial is retried {retries} from its last checkpoint"]
    lines += [f"storage: {plan.experiment}", f"reports: {os.path.join(plan.reports, plan.name)}"]
    return "\n".join(lines + ["dry run: nothing was started or written"])


def resources_text(resources: dict) -> str:
    def n(x, noun: str) -> str:  # 0.5 CPU, 1 CPU, 2 CPUs
        return f"{x:g} {noun}{'s' if x > 1 else ''}"

    return n(resources["cpu"], "CPU") + (f", {n(resources['gpu'], 'GPU')}" if resources["gpu"] else "")


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else os.path.join(storage, name)
