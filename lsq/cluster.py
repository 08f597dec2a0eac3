"""Starting a private local Ray or joining a cluster, and fitting the trials' resources to it."""

import os
import secrets
import socket
import sys

from . import ray_fixes
from .config import ConfigError
from .space import Space


def start_ray(address: str | None, dashboard: bool = False):
    """A private local Ray on 127.0.0.1 with a fresh auth token (default), or the cluster at `address`."""
    # snapshot after every step: a killed driver loses nothing it has seen
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    # a diverged trial's last report has no top1: under early stopping Tune would end the sweep for it
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic progress table
    if not address:
        if os.environ.pop("RAY_ADDRESS", None):
            print("note: RAY_ADDRESS is set but ignored; pass --address to join a cluster", file=sys.stderr)
        ray_fixes.loopback_node()
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
            # this cluster's own token: nothing read from or written to ~/.ray, no clash with other sweeps
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    else:
        token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        token = os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file)
        if token and "RAY_AUTH_MODE" not in os.environ:
            os.environ["RAY_AUTH_MODE"] = "token"  # Ray sends the token by itself only for address "auto"
        if _loopback_only(address):
            ray_fixes.loopback_node()  # or Ray rewrites 127.0.0.1 to an address the cluster does not answer on
    import logging

    import ray

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    quiet = ray.LoggingConfig(log_level="WARNING")
    with ray_fixes.ctrl_c_once_started(ray):
        if address:
            try:
                ray.init(address=address, logging_config=quiet)
            except Exception as e:
                raise ConfigError(
                    f"--address {address}: cannot join the Ray cluster ({type(e).__name__}: {str(e).strip()[:300]}). "
                    "Start one with `ray start --head`; if it uses token authentication, give this machine its "
                    "token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)"
                ) from None
        else:
            with ray_fixes.lean_local_ray(dashboard):
                options = {"include_dashboard": dashboard, "_system_config": ray_fixes.KEEP_IDLE_WORKERS}
                ctx = ray.init(address="local", logging_config=quiet, **options)
            if dashboard and getattr(ctx, "dashboard_url", None):
                print(f"Ray dashboard: http://{ctx.dashboard_url}")
    return ray


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


def local_gpus() -> int | None:
    """The GPUs a private Ray would give trials here (CUDA_VISIBLE_DEVICES included), or None."""
    ray_fixes.loopback_node()  # as start_ray sets it: read when Ray is imported
    try:
        from ray._private import accelerators

        manager = accelerators.get_accelerator_manager_for_resource("GPU")
        n = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        return int(min(n, len(visible)) if visible is not None else n)
    except Exception:  # another Ray: the dry run shows the resources as asked
        return None


def fit_to(cpus: float, gpus: float, resources: dict, space: Space, local: bool) -> dict:
    """Per-trial resources a cluster of `cpus` CPUs and `gpus` GPUs can give: CPU-only without
    GPUs, at most this machine's CPUs on a local Ray."""
    from .report import count

    res = dict(resources)
    if not gpus and any(t.device == "cuda" for t in space.trials):
        raise ConfigError(
            "key 'device' = 'cuda' but the cluster has no GPU; allowed here: auto, cpu "
            "(e.g. --set device=auto)"
        )
    if res["gpu"] and not gpus:
        print(f"note: the cluster has no GPU: running CPU-only (asked for gpu={res['gpu']} per trial)")
        res["gpu"] = 0
    elif res["gpu"] > gpus:
        raise ConfigError(
            f"resources: gpu={res['gpu']} per trial, but the cluster has {count(int(gpus), 'GPU')}; "
            f"allowed: at most {gpus:g} (resources.gpu in the space, or --gpus-per-trial)"
        )
    if local and res["cpu"] > cpus:
        print(
            f"note: this machine has {count(int(cpus), 'CPU')}: each trial gets {cpus:g} (asked for {res['cpu']})"
        )
        res["cpu"] = cpus
    return res


def fit_resources(ray, resources: dict, space: Space, local: bool) -> dict:
    cluster = ray.cluster_resources()
    return fit_to(cluster.get("CPU", 0), cluster.get("GPU", 0), resources, space, local)
