"""The first-model recipe's parts that the defaults turn on: close-mosaic under a time budget."""
from __future__ import annotations

from detect.ppyoloe import RunPaths
from detect.session import build_session, run_session


def test_close_mosaic_under_a_time_budget_closes_for_the_last_epochs_that_fit(tiny_spec, tmp_path):
    # 4 epochs and a 3-minute budget; the clock says every epoch took 60 s, so the epoch starting with 60 s
    # left (the third) is the first without Mosaic. The reader's own close_mosaic would only close epoch 4.
    spec = tiny_spec.with_cli({"train": {"epochs": 4, "batch_size": 4, "warmup_steps": 1, "multiscale": False,
                                         "mosaic": 1.0, "close_mosaic": 1, "time_budget_min": 3.0,
                                         "flip": 0.0, "hsv": [0, 0, 0]}})
    session = build_session(spec, RunPaths(tmp_path / "run"))
    cm = session.cb.close_mosaic
    assert cm is not None and session.loader.dataset.mosaic_epoch == 3  # epochs - close_mosaic
    cm.elapsed = lambda: 60.0 * int(session.trainer.status["epoch_id"])  # the run's clock, made exact
    result = run_session(session, quiet=True)
    assert result.metrics["epochs_run"] == 4
    assert cm.closed_at == 2 and session.loader.dataset.mosaic_epoch == 2
    samples = session.loader.samples()
    plain = (96, 128)  # the line's frames (h, w); a Mosaic sample is input_dim (96 x 96)
    assert samples[(1, 0, 0)]["image"].shape[:2] == (96, 96)
    assert samples[(2, 0, 0)]["image"].shape[:2] == plain and samples[(3, 0, 0)]["image"].shape[:2] == plain


def test_without_a_budget_the_reader_closes_mosaic_by_epochs(tiny_spec, tmp_path):
    spec = tiny_spec.with_cli({"train": {"epochs": 3, "mosaic": 1.0, "close_mosaic": 1, "time_budget_min": 0.0}})
    session = build_session(spec, RunPaths(tmp_path / "run"))
    assert session.cb.close_mosaic is None and session.loader.dataset.mosaic_epoch == 2


def test_with_mosaic_a_one_epoch_run_trains_without_it_instead_of_being_refused(tiny_spec, tmp_path):
    from detect.settings import TrainSettings

    assert TrainSettings().close_mosaic == 1
    spec = tiny_spec.with_cli({"train": {"epochs": 1, "mosaic": 0.5}})  # close_mosaic 1 leaves no Mosaic epoch
    session = build_session(spec, RunPaths(tmp_path / "one"))
    assert session.loader.dataset.mosaic_epoch == -1
    assert session.loader.samples()[(0, 0, 0)]["image"].shape[:2] == (96, 128)
    two = build_session(tiny_spec.with_cli({"train": {"epochs": 2, "mosaic": 0.5, "time_budget_min": 0.0}}),
                        RunPaths(tmp_path / "two"))
    assert two.loader.dataset.mosaic_epoch == 1
