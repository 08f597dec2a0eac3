"""Run a search space as a Ray Tune sweep, resumably, and write its report.

    python sweep.py                                    # search_spaces/smoke.yaml on a local Ray
    python sweep.py search_spaces/imagenet_resnet18_paper.yaml --set data_dir=/data/imagenet --dry-run
    python sweep.py SPACE --address auto --storage s3://bucket/runs     # on a cluster
    python sweep.py SPACE --resume                     # continue after Ctrl-C or a crash
    python sweep.py SPACE --report-only                # rebuild reports/<name>/ from storage

The flow: load and check the space and the flags (a mistake exits 2 before anything starts or is
written) -> start a private local Ray, or join --address -> a Tuner whose trials are the space's
configs, each checkpointed every epoch into <storage>/<name>/ -> reports/<name>/.
"""

import argparse
import dataclasses
import os
import sys

from lsq import cluster, preflight, resume, tuner
from lsq.cli import EXIT_HELP, run_command
from lsq.config import ConfigError
from lsq.space import check_name, check_resource, load_space, read_name

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SPACE = os.path.join("search_spaces", "smoke.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    epilog = EXIT_HELP + " (resume an interrupted sweep with --resume)"
    p = argparse.ArgumentParser(prog="python sweep.py", description=__doc__.split("\n\n")[0], epilog=epilog)
    p.add_argument("space", nargs="?", metavar="SPACE", help=f"search space YAML (default: {DEFAULT_SPACE})")
    p.add_argument("--address", help="join this Ray cluster, e.g. auto (default: a private local Ray)")
    p.add_argument(
        "--storage", default="runs", help="a folder or a URI such as s3://bucket/runs (default: runs)"
    )
    p.add_argument("--name", help="the sweep's folder under --storage (default: the space's name)")
    p.add_argument("--resume", action="store_true", help="continue the named sweep from its checkpoints")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, repeatable"
    )
    p.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at once")
    p.add_argument("--cpus-per-trial", type=float, metavar="N", help="override the space's resources.cpu")
    p.add_argument(
        "--gpus-per-trial", type=float, metavar="N", help="override resources.gpu (0.25: 4 per GPU)"
    )
    p.add_argument("--max-failures", type=int, metavar="N", help="retries of a crashed trial (default: 2)")
    p.add_argument("--dry-run", action="store_true", help="print the trials and resources; run nothing")
    p.add_argument("--reports", default="reports", metavar="DIR", help="reports go to DIR/<name>/")
    p.add_argument("--report-only", action="store_true", help="rebuild the report of a stored sweep")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard (local Ray only)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    interrupted = lambda: resume.interrupted_text(args, argv)  # noqa: E731
    return run_command(lambda: run(args, argv), args.debug, interrupted=interrupted)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from lsq import storage as st

    if args.address is not None:
        preflight.check_address(args.address)
    space_path = find_space(args.space)
    storage = args.storage if "://" in args.storage else os.path.abspath(args.storage)
    if args.report_only:
        return report_only(args, space_path, storage)

    plan = make_plan(args, argv, space_path, storage)
    args.experiment = plan.experiment  # for the message should Ctrl-C come
    exists = st.experiment_exists(plan.experiment)
    if not args.resume:  # a resumed trial continues from its checkpoints, not from these
        for note in preflight.check_inputs(plan.space, local=not args.address):
            print(f"note: {note}")
    if args.resume and exists:
        plan.stored = st.read_meta(plan.experiment)
        if plan.stored.get("resources"):  # Tune gives restored trials the resources they started with
            plan.resources = dict(plan.stored["resources"])
    running = resume.running_driver(plan.experiment)
    if args.resume and not exists and not running:
        raise ConfigError(
            f"--resume: no sweep '{plan.name}' in {storage} to resume; start it without --resume"
        )
    if args.dry_run:
        return dry_run(args, plan, exists, running)
    if running:
        raise ConfigError(resume.running_text(plan.name, plan.experiment, running))
    if exists and not args.resume:
        raise ConfigError(
            f"sweep '{plan.name}' already exists in {storage}. Continue it with\n  "
            f"{resume.resume_command(argv)}\nor start a new one with --name {plan.name}-2 "
            f"(or remove {plan.experiment})"
        )
    if args.address:
        preflight.check_reachable(args.address)
        if "://" not in storage:
            print(
                f"warning: --storage {storage} is a local path. On a multi-node Ray cluster every node writes its "
                "trials' checkpoints there, so it must be shared storage (the same NFS path on every node) or "
                "cloud storage such as --storage s3://bucket/runs.",
                file=sys.stderr,
            )

    preflight.create_storage(args.storage)
    with resume.one_driver(plan.experiment, plan.name):  # from here on, this driver alone writes the sweep
        if args.resume:
            resume.recover_snapshot(plan.experiment, plan.name)
            print(f"Resuming sweep '{plan.name}' from {plan.experiment}")
            resume.resume_notes(args, plan.space, plan.experiment, plan.stored or {})
        ray = cluster.start_ray(args.address, args.dashboard)
        try:
            plan.resources = cluster.fit_resources(ray, plan.resources, plan.space, local=not args.address)
            return tuner.run_sweep(plan)
        finally:
            ray.shutdown()


def make_plan(args, argv: list[str], space_path: str, storage: str) -> tuner.Plan:
    """The space and the flags, checked: nothing is started or written before this returns."""
    space = load_space(space_path, args.set)
    name = check_name(args.name, "--name") if args.name is not None else space.name
    preflight.check_storage(args.storage)
    preflight.check_reports(args.reports, name)
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
    flags = ("reports", "max_concurrent", "resume", "address", "tensorboard", "debug")
    kept = {flag: getattr(args, flag) for flag in flags}
    experiment = tuner.join(storage, name)
    return tuner.Plan(
        space, name, storage, experiment, resources=resources, max_failures=max_failures, argv=argv, **kept
    )


def dry_run(args, plan: tuner.Plan, exists: bool, running: str | None) -> int:
    shown = plan
    if plan.stored:  # a resume keeps the retries, concurrency and scheduler the sweep started with
        stored, space = plan.stored, plan.space
        if "early_stopping" in stored:
            space = dataclasses.replace(space, early_stopping=stored["early_stopping"])
        kept = {
            "max_failures": stored.get("max_failures", plan.max_failures),
            "max_concurrent": stored.get("max_concurrent"),
        }
        shown = dataclasses.replace(plan, space=space, **kept)
    print(tuner.dry_run_text(shown, None if args.address else cluster.local_gpus()))
    if args.resume and exists and not running:
        print("resume: the stored sweep's trials continue as they started")
        resume.resume_notes(args, plan.space, plan.experiment, plan.stored or {})
    if running:
        print(f"note: {resume.running_text(plan.name, plan.experiment, running)}")
    elif exists and not args.resume:
        print(
            f"note: sweep '{plan.name}' already exists in {plan.storage}: a real run needs --resume or another --name"
        )
    return 0


def report_only(args, space_path: str, storage: str) -> int:
    from lsq import report
    from lsq.storage import experiment_exists

    name = check_name(args.name, "--name") if args.name is not None else read_name(space_path)
    preflight.check_storage(args.storage, write=False)  # reading only: an archived, read-only sweep is fine
    preflight.check_reports(args.reports, name)
    experiment = tuner.join(storage, name)
    if not experiment_exists(experiment):
        raise ConfigError(f"--report-only: no sweep '{name}' in {storage} (nothing to report)")
    # a driver at work, or one that cannot be seen (cloud storage has no lock): trials may be running
    live = "://" in experiment or resume.running_driver(experiment) is not None
    tuner.print_report(report.build_report(experiment, args.reports, name, live=live))
    return 0


def find_space(given: str | None) -> str:
    """The space file as given, else (a relative path not found here) under the project."""
    given = given or DEFAULT_SPACE
    if not os.path.exists(given) and not os.path.isabs(given) and os.path.exists(os.path.join(HERE, given)):
        return os.path.join(HERE, given)
    return given


if __name__ == "__main__":
    sys.exit(main())
