"""`train_lsq(config)`: the Ray Tune function trainable, the trainer's one Ray edge. Each epoch reports
the metrics and a folder: CHECKPOINT_FILE (the trainer's checkpoint), LAYERS_FILE (per-layer diagnostics)."""

import json
import os
import tempfile
from warnings import warn

from ray import tune

from .config import TrialConfig

# torch and the trainer are imported inside the functions: the sweep's driver never needs them.

CHECKPOINT_FILE = "checkpoint.pt"
LAYERS_FILE = "layers.json"


def _threads() -> int:
    """Torch threads = the CPUs Ray assigned to this trial, so that trials do not fight for cores."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else torch.get_num_threads()


def _candidates(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The given checkpoint, then the trial's older ones (newest first) as fallbacks."""
    import pyarrow.fs as pafs

    parent, name = os.path.split(checkpoint.path.rstrip("/"))
    try:
        infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        infos = []
    older = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    older = sorted((n for n in older if n.startswith("checkpoint_") and n < name), reverse=True)
    return [checkpoint] + [tune.Checkpoint(os.path.join(parent, n), checkpoint.filesystem) for n in older]


def restore(trainer, checkpoint: tune.Checkpoint | None) -> None:
    """Load the newest readable checkpoint into the Trainer; with none, it starts at epoch 0."""
    from .train import CheckpointError

    if checkpoint is None:
        return
    for candidate in _candidates(checkpoint):
        try:
            with candidate.as_directory() as d:
                trainer.load(os.path.join(d, CHECKPOINT_FILE))
        except (CheckpointError, OSError) as e:
            warn(f"skipping checkpoint {candidate.path}: {e}")
            continue
        if candidate is not checkpoint:
            warn(f"resumed from the older checkpoint {candidate.path} (epoch {trainer.epoch})")
        return
    warn(f"no readable checkpoint for this trial (latest: {checkpoint.path}); restarting from epoch 0")


def deployment(cfg: TrialConfig, checkpoint_path: str) -> dict:
    """Integer-inference top-1 and the ONNX check of the final model (lsq/export.py)."""
    if cfg.dataset == "imagenet" or not cfg.deploy_check:  # ImageNet: too large for the CPU reference
        why = "skipped for imagenet" if cfg.dataset == "imagenet" else "skipped: deploy_check=false"
        return {"int_top1": None, "export_ok": None, "export_reason": why}
    from .export import deployment_check

    try:
        r = deployment_check(checkpoint_path, cfg.data_dir)
    except Exception as e:  # noqa: BLE001 (a failed check is a finding for the report, not a failed trial)
        return {"int_top1": None, "export_ok": False, "export_reason": f"{type(e).__name__}: {e}"}
    return {k: r.get(k) for k in ("int_top1", "export_ok", "export_reason")}


def train_lsq(config: dict) -> None:
    import torch

    from .policy import describe
    from .train import CheckpointError, DivergedError, Trainer

    cfg = TrialConfig.from_dict(dict(config), where="trial config")
    torch.set_num_threads(_threads())
    trainer = Trainer(cfg)  # a ConfigError (no data here, no CUDA) is retried: another node may have them
    restore(trainer, tune.get_checkpoint())
    try:
        for metrics in trainer.epochs():
            with tempfile.TemporaryDirectory(prefix="lsq-ckpt-") as d:
                path = os.path.join(d, CHECKPOINT_FILE)
                trainer.save(path)
                with open(os.path.join(d, LAYERS_FILE), "w") as f:
                    json.dump(describe(trainer.model).to_dict("records"), f)  # per-layer diagnostics
                if trainer.epoch == cfg.epochs:
                    metrics.update(deployment(cfg, path))
                try:  # Ray copies the checkpoint into the sweep's storage here
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
                except OSError as e:  # storage full, read-only, gone: Tune retries from the last good one
                    why = f"could not write the checkpoint to the sweep's storage: {e}"
                    raise CheckpointError(f"epoch {trainer.epoch}: {why}") from e
    except DivergedError as e:  # a retry would diverge again: report why, and stop
        tune.report({"epoch": trainer.epoch, "best_top1": trainer.best_top1, "failed_reason": str(e)})
