"""`train_lsq(config)`: the Ray Tune function trainable, and the project's one Ray edge.

Everything else is the plain Trainer. Per epoch this reports the metrics (epoch, top1, top5,
loss, train_loss, best_top1, lr, epoch_seconds, images_per_second; accuracies in percent) with a
checkpoint directory holding the files below. The last epoch also reports int_top1 (top-1 of
integer inference) and export_ok (the ONNX model agrees with the fake-quantized one).

    checkpoint.pt   the trainer's checkpoint dict (model + quantizer init flags, optimizer,
                    lr_scheduler, epoch, best_top1, history, RNG states)
    layers.json     per-layer diagnostics: bits, learned step sizes, weight quantization error

On restore, Tune hands back the latest checkpoint and the run continues at the next epoch,
identical to an uninterrupted run (on the CPU, with a fixed seed).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import TYPE_CHECKING

from ray import tune
from ray.tune.logger import TBXLoggerCallback

from .config import TrialConfig

if TYPE_CHECKING:
    from .train import Trainer

# torch and the trainer are imported where a trial runs, not here: the sweep's driver imports this
# module only to hand `train_lsq` to Tune, and never needs torch (3-4 s of its start on 2 cores).

CHECKPOINT_FILE = "checkpoint.pt"
LAYERS_FILE = "layers.json"


class NoTensorBoard(TBXLoggerCallback):
    """Stands in for Tune's TensorBoard logger, which Tune adds to every run that has none. That
    logger imports tensorboardX, which imports torch: 3-4 s of the driver's start on 2 cores, for
    event files this project's reports do not read. `sweep.py --tensorboard` keeps Tune's own."""

    def __init__(self):  # not TBXLoggerCallback's: that is where tensorboardX is imported
        pass

    def log_trial_start(self, trial):
        pass

    def log_trial_result(self, iteration, trial, result):
        pass

    def log_trial_end(self, trial, failed=False):
        pass


def _threads() -> int:
    """Torch threads = the CPUs Ray assigned to this trial."""
    import ray
    import torch

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker (e.g. called directly in a test)
        cpus = None
    return max(1, int(cpus)) if cpus else torch.get_num_threads()


def _candidates(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The given checkpoint, then the trial's older ones (newest first) as fallbacks."""
    import pyarrow.fs as pafs

    parent, name = os.path.split(checkpoint.path.rstrip("/"))
    try:
        infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
        older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                        and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    except OSError:
        older = []
    return [checkpoint] + [tune.Checkpoint(os.path.join(parent, n), checkpoint.filesystem) for n in older]


def restore(trainer: Trainer, checkpoint: tune.Checkpoint | None) -> None:
    """Continue from the latest readable checkpoint; a corrupt one falls back to the one before
    it, and with none readable the trial restarts from scratch with a warning."""
    from .train import CheckpointError

    if checkpoint is None:
        return
    for candidate in _candidates(checkpoint):
        try:
            with candidate.as_directory() as d:
                trainer.load(os.path.join(d, CHECKPOINT_FILE))
        except (CheckpointError, OSError) as e:
            warnings.warn(f"skipping checkpoint {candidate.path}: {e}")
            continue
        if candidate is not checkpoint:
            warnings.warn(f"resumed from the older checkpoint {candidate.path} (epoch {trainer.epoch})")
        return
    warnings.warn(f"no readable checkpoint for this trial (latest: {checkpoint.path}); restarting from epoch 0")


def deployment(cfg: TrialConfig, checkpoint_path: str) -> dict:
    """Does the final model survive deployment? Integer-inference top-1 and the ONNX check
    (lsq/export.py), reported with the last epoch. ImageNet's test split is too large for the
    CPU reference path, so it is skipped there, as it is wherever the config says deploy_check=false."""
    if cfg.dataset == "imagenet":
        return {"int_top1": None, "export_ok": None, "export_reason": "skipped for imagenet"}
    if not cfg.deploy_check:
        return {"int_top1": None, "export_ok": None, "export_reason": "skipped: deploy_check=false"}
    from .export import deployment_check

    try:
        r = deployment_check(checkpoint_path, cfg.data_dir)
    except Exception as e:  # a failed check is a finding for the report, not a failed trial
        return {"int_top1": None, "export_ok": False, "export_reason": f"{type(e).__name__}: {e}"}
    return {"int_top1": r.get("int_top1"), "export_ok": r.get("export_ok"), "export_reason": r.get("export_reason")}


def train_lsq(config: dict) -> None:
    import torch

    from .train import CheckpointError, DivergedError, Trainer

    cfg = TrialConfig.from_dict(dict(config), where="trial config")
    torch.set_num_threads(_threads())
    # A ConfigError here (no data set in data_dir, no CUDA) is an error Tune retries: on a cluster
    # it can be one node's, and a retry may land on another.
    trainer = Trainer(cfg)

    restore(trainer, tune.get_checkpoint())

    try:
        for metrics in trainer.epochs():
            with tempfile.TemporaryDirectory(prefix="lsq-ckpt-") as d:
                trainer.save(os.path.join(d, CHECKPOINT_FILE))
                with open(os.path.join(d, LAYERS_FILE), "w") as f:
                    json.dump(trainer.layers(), f)
                if trainer.epoch == cfg.epochs:
                    metrics.update(deployment(cfg, os.path.join(d, CHECKPOINT_FILE)))
                try:  # Ray copies the checkpoint into the sweep's storage here
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
                except OSError as e:  # storage full, read-only, gone: say so, Tune retries from the last good one
                    raise CheckpointError(f"epoch {trainer.epoch}: could not write the checkpoint to the sweep's "
                                          f"storage: {e}") from e
    except DivergedError as e:
        # Retrying from the last checkpoint would diverge again: report the reason and stop.
        tune.report({"epoch": trainer.epoch, "best_top1": trainer.best_top1, "failed_reason": str(e)})
