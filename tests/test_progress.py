"""Progress that suits where it goes: a bar on a terminal; in a log file one plain line every --progress-interval
seconds and one at the end, so a run's log stays a few dozen lines however many steps it takes."""

import dataclasses
import io
import time

import pytest
import torch

import data
import eval_zeroshot
import train
from tools import ablate, alignment
from util.progress import DEFAULT_INTERVAL, Progress, lines_every, track

TINY_RUN = ["--batch-size", "8", "--num-workers", "0", "--no-eval", "--log-interval", "1", "--depth", "1",
            "--decoder-depth", "1", "--text-depth", "1", "--vocab-size", "300"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """A fake time.monotonic: set clock.now (seconds) to move it."""
    class Clock:
        now = 0.0
    monkeypatch.setattr(time, "monotonic", lambda: Clock.now)
    return Clock


def test_a_log_file_gets_one_line_per_elapsed_interval_and_none_before(clock):
    log = io.StringIO()
    progress = Progress(total=100, desc="train", interval=30, file=log)
    for step in range(1, 30):
        clock.now = step  # one step a second
        progress.update(loss="2.000")
    assert log.getvalue() == ""
    for step in range(30, 96):
        clock.now = step
        progress.update(loss=f"{3 - step / 100:.3f}")
    assert log.getvalue().splitlines() == ["train: step 30/100 (30%), 1.00 step/s, loss 2.700",
                                           "train: step 60/100 (60%), 1.00 step/s, loss 2.400",
                                           "train: step 90/100 (90%), 1.00 step/s, loss 2.100"]


def test_the_last_line_is_written_at_close_once(clock):
    log = io.StringIO()
    with Progress(total=10, desc="cache", initial=4, interval=30, unit="img", file=log) as progress:
        clock.now = 3.0
        progress.update(6)
    assert log.getvalue() == "cache: img 10/10 (100%), 2.00 img/s\n"  # the rate counts this session's images only
    progress.close()
    assert log.getvalue().count("\n") == 1


def test_units_slower_than_one_a_second_read_as_seconds_each(clock):
    log = io.StringIO()
    with Progress(total=3, desc="ablation", interval=30, unit="run", file=log) as progress:
        for run in range(3):
            clock.now += 300  # five minutes a run
            progress.update()
    assert log.getvalue().splitlines() == ["ablation: run 1/3 (33%), 300.0 s/run",
                                           "ablation: run 2/3 (67%), 300.0 s/run",
                                           "ablation: run 3/3 (100%), 300.0 s/run"]


def test_an_entry_point_sets_the_interval_for_the_loops_inside_it(clock):
    with lines_every(5):
        log = io.StringIO()
        progress = Progress(total=20, desc="zero-shot", unit="batch", file=log)
        for batch in range(1, 11):
            clock.now = batch  # one batch a second: a line at 5 s and at 10 s
            progress.update(loss=torch.tensor(2 / 3))  # a tensor is formatted when shown, 4 significant digits
    assert log.getvalue().splitlines() == ["zero-shot: batch 5/20 (25%), 1.00 batch/s, loss 0.6667",
                                           "zero-shot: batch 10/20 (50%), 1.00 batch/s, loss 0.6667"]
    assert Progress(file=io.StringIO()).interval == DEFAULT_INTERVAL  # restored on leaving


def test_a_terminal_gets_a_bar_not_lines(clock):
    screen = Terminal()
    with Progress(total=50, desc="train", interval=30, file=screen) as progress:
        for step in range(50):
            clock.now = step
            progress.update(loss="1.000")
    assert "100%|" in screen.getvalue() and "\r" in screen.getvalue()
    assert "train: step" not in screen.getvalue()


def test_a_disabled_progress_and_a_short_inner_loop_print_nothing(clock, capsys):
    log = io.StringIO()
    with Progress(total=10, interval=0, enabled=False, file=log) as progress:
        progress.update(10)
    assert list(track(range(5), "grounding")) == list(range(5))  # leave=False: no final line
    assert log.getvalue() == "" and capsys.readouterr().err == ""


def test_every_script_with_progress_has_the_interval_flag():
    for config in (train.TrainConfig, data.CacheConfig, eval_zeroshot.EvalConfig, ablate.AblateConfig,
                   alignment.AlignmentConfig):
        interval = {spec.name: spec for spec in dataclasses.fields(config)}["progress_interval"]
        assert interval.default == 30.0, config


def printed_lines(capfd) -> list[str]:
    out, err = capfd.readouterr()
    assert "\r" not in out + err  # no bar redraws in a file
    return (out + err).splitlines()


def test_a_train_log_stays_short_however_many_steps_it_runs(synthetic_root, tmp_path, capfd):
    counts = {}
    for epochs in (1, 3):  # 16 and 48 steps, each logged, all well inside one 30 s interval (the first run may
        # also build the world's image cache)
        out_dir = tmp_path / f"epochs{epochs}"
        assert train.main(["--root", str(synthetic_root), "--out-dir", str(out_dir), "--epochs", str(epochs),
                           *TINY_RUN]) == 0
        lines = printed_lines(capfd)
        assert [line for line in lines if line.startswith("train: ")] == [
            next(line for line in lines if line.startswith(f"train: step {16 * epochs}/{16 * epochs} (100%)"))]
        counts[epochs] = len(lines)
    assert counts[3] <= counts[1] < 40, counts


def test_the_interval_flag_sets_the_lines_and_a_resumed_run_may_change_it(synthetic_root, tmp_path, capfd):
    common = ["--root", str(synthetic_root), "--out-dir", str(tmp_path), "--epochs", "1", *TINY_RUN]
    assert train.main([*common, "--progress-interval", "0", "--stop-after-steps", "5"]) == 0
    steps = [line.split(",")[0] for line in printed_lines(capfd) if line.startswith("train: ")]
    assert steps == [f"train: step {step}/16 ({100 * step / 16:.0f}%)" for step in range(1, 6)]
    assert train.main(["--resume", str(tmp_path / "checkpoint.pt"), "--out-dir", str(tmp_path), "--num-workers", "0",
                       "--no-eval", "--progress-interval", "1000"]) == 0
    assert [line.split(",")[0] for line in printed_lines(capfd) if line.startswith("train: ")] == [
        "train: step 16/16 (100%)"]
