"""The Tune trainable in a real local Ray: metrics, checkpoints, and exact resume after a crash."""

import json
import os
import sys

import pytest

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from lsq.config import TrialConfig  # noqa: E402
from lsq.trainable import CHECKPOINT_FILE, LAYERS_FILE, deployment, train_lsq  # noqa: E402

CFG = {
    "dataset": "digits",
    "model": "resnet20",
    "w_bits": 4,
    "a_bits": 4,
    "epochs": 3,
    "lr": 0.1,
    "batch_size": 128,
    "seed": 3,
}
METRICS = (
    "epoch",
    "top1",
    "top5",
    "loss",
    "train_loss",
    "best_top1",
    "lr",
    "epoch_seconds",
    "images_per_second",
)


# the workers cannot import this test module: ship crash_once by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def crash_once(config):
    """train_lsq; given a "_marker" path, the worker raises right after its first report (once
    per marker file)."""
    import lsq.trainable as trainable

    config = dict(config)  # (Tune's result keeps the "_marker" that tells the trials apart)
    marker = config.pop("_marker")
    if marker is None:
        return train_lsq(config)
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


def fit(config, markers, storage):
    """One trial per marker (None: no crash), side by side on one CPU each; their results in that order."""
    tuner = tune.Tuner(
        tune.with_resources(crash_once, {"cpu": 1}),
        param_space={**config, "_marker": tune.grid_search(markers)},
        run_config=tune.RunConfig(
            name="fit",
            storage_path=str(storage),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    return [next(r for r in results if r.config["_marker"] == m) for m in markers]


def history(result):
    rows = result.metrics_dataframe.to_dict("records")
    return [{k: r[k] for k in METRICS if k not in ("epoch_seconds", "images_per_second")} for r in rows]


@pytest.mark.slow  # a real local Ray
def test_trainable_reports_checkpoints_and_resumes_exactly(local_ray, tmp_path, monkeypatch):
    # Tune as sweep.py runs it: its state goes to storage after every step, and a restarted
    # trial keeps the result.json this driver wrote. Without the latter, a trial restarted right
    # after its first report could copy back from storage a result.json that lacked that report,
    # when the copy to storage had not caught up (history [2, 3]; seen under load).
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    from ray.tune.logger import logger as tune_logger

    from lsq.ray_fixes import results_survive_a_restart

    cls = tune_logger.LoggerCallback
    monkeypatch.setattr(cls, "_restore_from_remote", cls._restore_from_remote)  # restored afterwards
    assert results_survive_a_restart()
    # the same trial twice at once: straight, and crashed after epoch 1
    # (the marker must not be a path Tune creates itself, such as the experiment's folder)
    marker = tmp_path / "crash_marker"
    straight, crashed = fit(CFG, [None, str(marker)], tmp_path)
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

    # the last epoch carries the deployment check: integer inference agrees with the fake-quantized model
    assert straight.metrics["export_ok"] is True, straight.metrics.get("export_reason")
    assert abs(straight.metrics["int_top1"] - straight.metrics["top1"]) <= 1.0

    assert marker.exists()  # the crash did happen
    # Tune restarted the trial from the epoch-1 checkpoint: epochs 1, 2, 3 once each, same numbers,
    # and the last two came after the restore
    assert [m["epoch"] for m in history(crashed)] == [1, 2, 3]
    assert crashed.metrics_dataframe["iterations_since_restore"].tolist() == [1, 1, 2]
    assert history(crashed) == history(straight)


@pytest.mark.parametrize(
    "assigned, threads", [({"CPU": 1.0}, 1), ({"CPU": 2.0, "GPU": 1.0}, 2), ({"CPU": 0.5}, 1)]
)
def test_a_trial_trains_with_as_many_threads_as_it_has_cpus(monkeypatch, assigned, threads):
    """Two 1-CPU trials on 2 cores must not each start 2 threads (they would fight for the cores)."""
    from lsq.trainable import _threads

    class Context:
        def get_assigned_resources(self):
            return assigned

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    assert _threads() == threads


def test_restore_falls_back_to_an_older_checkpoint_then_to_epoch_0(tmp_path):
    """A trial whose latest checkpoint is unreadable continues from the one before it (losing one
    more epoch, not the run); with none readable it starts over, and says so."""
    from lsq.train import Trainer
    from lsq.trainable import restore

    cfg = TrialConfig.from_dict(CFG)
    trainer = Trainer(cfg)
    folders = []
    for epoch in (1, 2):
        trainer.epoch = epoch
        folder = tmp_path / f"checkpoint_{epoch - 1:06d}"
        folder.mkdir()
        trainer.save(str(folder / CHECKPOINT_FILE))
        folders.append(folder)
    latest = tune.Checkpoint.from_directory(str(folders[-1]))

    fresh = Trainer(cfg)
    restore(fresh, latest)
    assert fresh.epoch == 2

    (folders[1] / CHECKPOINT_FILE).write_bytes(b"truncated")
    fresh = Trainer(cfg)
    with pytest.warns(UserWarning) as said:
        restore(fresh, latest)
    assert fresh.epoch == 1
    assert [str(w.message).split(":")[0] for w in said] == [
        f"skipping checkpoint {folders[1]}",
        f"resumed from the older checkpoint {folders[0]} (epoch 1)",
    ]

    (folders[0] / CHECKPOINT_FILE).write_bytes(b"truncated")
    fresh = Trainer(cfg)
    with pytest.warns(UserWarning) as said:
        restore(fresh, latest)
    assert fresh.epoch == 0
    assert "is unreadable" in str(said[0].message) and len(said) == 3
    assert (
        str(said[-1].message)
        == f"no readable checkpoint for this trial (latest: {folders[1]}); restarting from epoch 0"
    )


def test_restore_with_the_newest_corrupt_takes_the_next_newest_not_the_oldest(tmp_path):
    """Three checkpoints kept (epochs 1, 2, 3), the newest unreadable: the trial continues from
    epoch 2, the newest readable one, with epoch 2's state (best_top1, weights); not from the
    oldest (epoch 1) and not from scratch."""
    import torch

    from lsq.train import Trainer
    from lsq.trainable import restore

    cfg = TrialConfig.from_dict(CFG)
    trainer = Trainer(cfg)
    folders, weights = [], {}
    for epoch in (1, 2, 3):
        trainer.epoch, trainer.best_top1 = epoch, 10.0 * epoch  # a different state in each
        with torch.no_grad():
            trainer.model.fc.bias.fill_(float(epoch))
        weights[epoch] = trainer.model.fc.bias.detach().clone()
        folder = tmp_path / f"checkpoint_{epoch - 1:06d}"
        folder.mkdir()
        trainer.save(str(folder / CHECKPOINT_FILE))
        folders.append(folder)
    (folders[2] / CHECKPOINT_FILE).write_bytes(b"truncated")

    fresh = Trainer(cfg)
    with pytest.warns(UserWarning) as said:
        restore(fresh, tune.Checkpoint.from_directory(str(folders[2])))
    assert (fresh.epoch, fresh.best_top1) == (2, 20.0)
    assert torch.equal(fresh.model.fc.bias, weights[2])
    assert [str(w.message).split(":")[0] for w in said] == [
        f"skipping checkpoint {folders[2]}",
        f"resumed from the older checkpoint {folders[1]} (epoch 2)",
    ]


def test_deployment_check_runs_unless_the_config_turns_it_off(tmp_path):
    """deploy_check=false skips the check (minutes per CIFAR-10 trial) and says why in the report's
    fields; left on, even a checkpoint that cannot be read is a finding, not a failed trial."""
    missing = str(tmp_path / "no-such-checkpoint.pt")
    off = deployment(TrialConfig.from_dict({**CFG, "deploy_check": False}), missing)
    assert off == {"int_top1": None, "export_ok": None, "export_reason": "skipped: deploy_check=false"}
    on = deployment(TrialConfig.from_dict(CFG), missing)
    assert on["int_top1"] is None and on["export_ok"] is False and "no such file" in on["export_reason"]
