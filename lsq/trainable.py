"""`train_lsq(config)`: the Ray Tune function trainable, and the project's one Ray edge.

Everything else is the plain Trainer. Per epoch this reports the metrics (epoch, top1, top5,
loss, train_loss, best_top1, lr, epoch_seconds, images_per_second; accuracies in percent) with a
checkpoint directory holding:

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

import torch
from ray import tune

from .config import TrialConfig
from .train import DivergedError, Trainer

CHECKPOINT_FILE = "checkpoint.pt"
LAYERS_FILE = "layers.json"


def _threads() -> int:
    """Torch threads = the CPUs Ray assigned to this trial."""
    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker (e.g. called directly in a test)
        cpus = None
    return max(1, int(cpus)) if cpus else torch.get_num_threads()


def train_lsq(config: dict) -> None:
    cfg = TrialConfig.from_dict(dict(config), where="trial config")
    torch.set_num_threads(_threads())
    trainer = Trainer(cfg)

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load(os.path.join(d, CHECKPOINT_FILE))

    try:
        for metrics in trainer.epochs():
            with tempfile.TemporaryDirectory(prefix="lsq-ckpt-") as d:
                trainer.save(os.path.join(d, CHECKPOINT_FILE))
                with open(os.path.join(d, LAYERS_FILE), "w") as f:
                    json.dump(trainer.layers(), f)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
    except DivergedError as e:
        # Retrying from the last checkpoint would diverge again: report the reason and stop.
        tune.report({"epoch": trainer.epoch, "best_top1": trainer.best_top1, "failed_reason": str(e)})
