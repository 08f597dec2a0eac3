"""Resuming a sweep whose driver was killed: Tune's snapshot files, cut short by a kill mid-copy,
are set aside so that Tune restores the whole session before them."""

import json
import os
from pathlib import Path

import pytest

from lsq import report, resume, storage
from lsq.config import ConfigError


def snapshot_session(exp: Path, session: str, trials: list[str], cut: str = ""):
    """One driver session's snapshot files as Tune writes them: the experiment state (JSON) and
    the searcher's state (a pickle, named .json). cut="state" or "searcher" leaves that file as a
    killed copy does: the state empty, the pickle cut mid-way."""
    import pickle

    state = json.dumps(
        {
            "trial_data": [
                [json.dumps({"trial_id": t, "status": "RUNNING", "relative_logdir": t}), "{}"] for t in trials
            ],
            "runner_data": {},
        }
    )
    searcher = pickle.dumps({"session": session, "trials": trials})
    (exp / f"experiment_state-{session}.json").write_text("" if cut == "state" else state)
    (exp / f"basic-variant-state-{session}.json").write_bytes(
        searcher[: len(searcher) // 2] if cut == "searcher" else searcher
    )


def tune_would_restore(exp: Path) -> tuple[str, dict]:
    """The experiment state file and the searcher state Tune 2.60 itself picks on a resume."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.utils.util import _load_newest_checkpoint

    return (
        os.path.basename(_find_newest_experiment_checkpoint(str(exp))),
        _load_newest_checkpoint(str(exp), "basic-variant-state-*.json"),
    )


@pytest.mark.parametrize("cut", ["state", "searcher"])
def test_a_snapshot_cut_short_is_set_aside_and_the_whole_one_before_it_restored(tmp_path, cut):
    """A driver killed while Tune copied its snapshot to storage leaves the files cut short,
    and Tune's resume fails on the newest. recover_snapshot sets aside that session's files, so
    Tune restores the whole session before it, state and searcher from the same session."""
    exp = tmp_path / "exp"
    exp.mkdir()
    snapshot_session(exp, "2026-01-01_00-00-00", ["a"])
    snapshot_session(exp, "2026-01-01_00-01-00", ["a", "b"])
    snapshot_session(exp, "2026-01-01_00-02-00", ["a", "b"], cut=cut)
    assert storage.usable_session(storage.Storage(str(exp)))[0] == "2026-01-01_00-01-00"
    assert [t["folder"] for t in report.tune_trials(storage.Storage(str(exp)))] == ["a", "b"]  # reports too

    leftover = (
        exp / ".experiment_state-2026-01-01_00-02-00.json.99.tmp"
    )  # a whole-file copy a kill interrupted
    leftover.write_text("{")
    set_aside = resume.recover_snapshot(str(exp), "exp")
    assert not leftover.exists()
    assert set_aside == [
        "basic-variant-state-2026-01-01_00-02-00.json",
        "experiment_state-2026-01-01_00-02-00.json",
    ]
    assert all((exp / (n + ".cut")).exists() and not (exp / n).exists() for n in set_aside)
    state_file, searcher = tune_would_restore(exp)
    assert state_file == "experiment_state-2026-01-01_00-01-00.json"
    assert searcher == {"session": "2026-01-01_00-01-00", "trials": ["a", "b"]}
    assert resume.recover_snapshot(str(exp), "exp") == []  # a whole newest snapshot: nothing to do


def test_with_no_whole_snapshot_left_the_resume_is_refused_and_nothing_renamed(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    snapshot_session(exp, "2026-01-01_00-00-00", ["a"], cut="state")
    before = sorted(os.listdir(exp))
    with pytest.raises(
        ConfigError,
        match="--resume: cannot resume sweep .exp.: every snapshot.*cut short.*experiment_state-2026-01-01_00-00-00.json",
    ):
        resume.recover_snapshot(str(exp), "exp")
    assert sorted(os.listdir(exp)) == before

    snapshot_session(exp, "2026-01-01_00-01-00", ["a"])  # a whole session, but tuner.pkl is cut
    (exp / "tuner.pkl").write_bytes(b"\x80\x05\x95")
    with pytest.raises(ConfigError, match="tuner.pkl was cut short"):
        resume.recover_snapshot(str(exp), "exp")


def test_whole_snapshot_file_reads_without_unpickling():
    """The check walks a pickle's opcodes and never runs it: a pickle that would run code on
    loading is whole (Tune's own files are loaded by Tune), and nothing in it runs here."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch /tmp/lsq-whole-snapshot-ran",))

    data = pickle.dumps(Boom())
    assert storage.whole_snapshot_file("tuner.pkl", data)
    assert not os.path.exists("/tmp/lsq-whole-snapshot-ran")
    assert not storage.whole_snapshot_file("tuner.pkl", data[:-1])
    assert not storage.whole_snapshot_file("experiment_state-x.json", b'{"trial_data": [')
    assert storage.whole_snapshot_file("sweep.json", b"")  # not Tune's: taken as it is
