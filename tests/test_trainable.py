"""The Tune trainable in a real local Ray: metrics, checkpoints, and exact resume after a crash."""

import json
import os
import sys

import pytest

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from lsq.config import TrialConfig  # noqa: E402
from lsq.trainable import CHECKPOINT_FILE, LAYERS_FILE, deployment, train_lsq  # noqa: E402

CFG = {"dataset": "digits", "model": "resnet20", "w_bits": 4, "a_bits": 4, "epochs": 3,
       "lr": 0.1, "batch_size": 128, "seed": 3}
METRICS = ("epoch", "top1", "top5", "loss", "train_loss", "best_top1", "lr", "epoch_seconds", "images_per_second")


# the workers cannot import this test module: ship crash_once by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def crash_once(config):
    """train_lsq, but the worker raises right after its first report (once per marker file)."""
    import lsq.trainable as trainable

    marker = config.pop("_marker")
    real_report = trainable.tune.report

    def report(*args, **kwargs):
        real_report(*args, **kwargs)
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("simulated crash after epoch 1")

    trainable.tune.report = report
    try:
        train_lsq(config)
    finally:
        trainable.tune.report = real_report


def fit(trainable, config, storage, name):
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 2}),
        param_space=config,
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    return results[0]


def history(result):
    rows = result.metrics_dataframe.to_dict("records")
    return [{k: r[k] for k in METRICS if k not in ("epoch_seconds", "images_per_second")} for r in rows]


def test_trainable_reports_checkpoints_and_resumes_exactly(local_ray, tmp_path):
    straight = fit(train_lsq, CFG, tmp_path, "straight")
    for k in METRICS:
        assert k in straight.metrics, k
    assert straight.metrics["epoch"] == 3
    assert 0 <= straight.metrics["top1"] <= 100

    # each report carries a loadable checkpoint and per-layer diagnostics
    with straight.checkpoint.as_directory() as d:
        import torch

        state = torch.load(os.path.join(d, CHECKPOINT_FILE), weights_only=True)
        assert state["epoch"] == 3 and TrialConfig.from_dict(state["config"]) == TrialConfig.from_dict(CFG)
        for key in ("model", "optimizer", "lr_scheduler", "best_top1", "rng"):
            assert key in state
        layers = json.load(open(os.path.join(d, LAYERS_FILE)))
        assert layers[0]["layer"] == "conv1" and layers[0]["w_bits"] == 8 and layers[0]["a_signed"] is True
        assert all(row["w_step"] > 0 for row in layers)

    crashed = fit(crash_once, {**CFG, "_marker": str(tmp_path / "crashed")}, tmp_path, "crashed")
    assert os.path.exists(tmp_path / "crashed")  # the crash did happen
    # Tune restarted the trial from the epoch-1 checkpoint: epochs 1, 2, 3 once each, same numbers
    assert [m["epoch"] for m in history(crashed)] == [1, 2, 3]
    assert history(crashed) == history(straight)


def test_deployment_check_runs_unless_the_config_turns_it_off(tmp_path):
    """deploy_check=false skips the check (minutes per CIFAR-10 trial) and says why in the report's
    fields; left on, even a checkpoint that cannot be read is a finding, not a failed trial."""
    missing = str(tmp_path / "no-such-checkpoint.pt")
    off = deployment(TrialConfig.from_dict({**CFG, "deploy_check": False}), missing)
    assert off == {"int_top1": None, "export_ok": None, "export_reason": "skipped: deploy_check=false"}
    on = deployment(TrialConfig.from_dict(CFG), missing)
    assert on["int_top1"] is None and on["export_ok"] is False and "no such file" in on["export_reason"]
