"""Reliability (docs/reliability.md): SIGTERM and Ctrl-C write a checkpoint and exit; one run per output folder;
a full disk loses nothing and names the file; a damaged checkpoint, log or record is an error naming the file.
(A kill at any instant: test_fault_injection.py.)"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_runs import assert_equal_states, in_child, losses, one_thread, run_args  # noqa: F401 (autouse)
from matplotlib.figure import Figure

import data
import eval_zeroshot
import finetune
import maco
import train
from tools import ablate
from util import checkpoint as files
from util.run_guard import OutDirLock, StopSignals

# ----------------------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C

@pytest.mark.slow
@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits(signal_number, exit_code, synthetic_root, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", *run_args(synthetic_root, out, "--no-eval",
                                                                      "--log-interval", "1", "--epochs", "3")],
                               cwd=Path(train.__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    stopped = re.search(r"stopped at step (\d+); continue with: python train\.py --resume (\S+)", stdout)
    assert stopped and Path(stopped.group(2)) == out / "checkpoint.pt", stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == int(stopped.group(1)) < 48
    assert "Traceback" not in stderr and not (out / "run.lock").exists()
    assert train.main(["--resume", str(out / "checkpoint.pt"), "--out-dir", str(out), "--num-workers", "0"]) == 0
    straight = tmp_path / "straight"
    assert train.main(run_args(synthetic_root, straight, "--no-eval", "--log-interval", "1", "--epochs", "3")) == 0
    assert_equal_states(torch.load(out / "checkpoint.pt", weights_only=True)["model"],
                        torch.load(straight / "checkpoint.pt", weights_only=True)["model"])
    assert losses(out) == losses(straight)


def test_a_second_signal_ends_the_process_at_once():
    def work():
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested == signal.SIGTERM and stop.exit_code == 143
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        return 0
    status, seconds = in_child(work)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM and seconds < 10


def agree_on_stopping(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    stop = StopSignals()
    stop.requested = signal.SIGTERM if rank == 1 else 0  # the signal reached one process only
    decisions = [stop.should_stop(2, torch.device("cpu"), at_log) for at_log in (False, True)]
    Path(folder, f"rank{rank}.json").write_text(json.dumps(decisions))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_the_processes_of_a_multi_process_run_agree_to_stop_at_a_log_step(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(agree_on_stopping, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)] == [[False, True]] * 2


def test_signal_handlers_are_restored_after_the_run():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals():
        assert signal.getsignal(signal.SIGINT) != before
    assert signal.getsignal(signal.SIGINT) == before


# ----------------------------------------------------------------------------------------------------------
# One run per output folder

@pytest.fixture
def other_process_holding(tmp_path):
    """A second process that holds tmp_path/out's lock until the test ends."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom util.run_guard import OutDirLock\n"
                               "with OutDirLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)",
                               str(tmp_path / "out")], cwd=Path(train.__file__).parent, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield holder
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("main, argv", [
    (train.main, ["--num-workers", "0"]),
    (finetune.main, ["--scratch"]),
    (ablate.main, ["--quick"]),
])
def test_a_second_command_on_a_folder_in_use_stops_at_once_naming_the_other(main, argv, other_process_holding,
                                                                             tmp_path, capsys):
    started = time.time()
    assert main(argv + ["--out-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"--out-dir {tmp_path / 'out'} is in use by process {other_process_holding.pid}" in error, error
    assert time.time() - started < 10 and other_process_holding.poll() is None


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(tmp_path, capsys):
    status, _ = in_child(lambda: OutDirLock(tmp_path).__enter__() and os.kill(os.getpid(), signal.SIGKILL))
    assert os.WIFSIGNALED(status)
    dead = (tmp_path / "run.lock").read_text()
    with OutDirLock(tmp_path):
        assert (tmp_path / "run.lock").read_text() == str(os.getpid())
    assert f"taking over from process {dead}" in capsys.readouterr().err
    assert not (tmp_path / "run.lock").exists()


# ----------------------------------------------------------------------------------------------------------
# A full disk

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then_disk_full(path, data: bytes):
    Path(path).write_bytes(data[:len(data) // 2])
    disk_full()


@pytest.mark.parametrize("name, write, library, fails", [
    ("checkpoint.pt", lambda path: files.save_checkpoint(path, {"step": 2}), (torch, "save"),
     lambda state, path: half_then_disk_full(path, b"PK" * 100)),
    ("metrics.json", lambda path: files.write_json({"auc": 0.9}, path), (Path, "write_text"),
     lambda self, text: half_then_disk_full(self, text.encode())),
    ("loss.png", lambda path: train.plot_losses(path.parent / "log.jsonl", path),
     (Figure, "savefig"), lambda self, path, **kw: half_then_disk_full(path, b"x" * 99)),
    ("status.npy", lambda path: files.write_atomic(path, lambda temp: data.save_array(temp, np.zeros(3))),
     (np, "save"), lambda handle, array: disk_full()),
    ("images.npy", lambda path: data.create_image_store(path, (4, 8, 8)), (os, "posix_fallocate"), disk_full),
])
def test_a_full_disk_keeps_the_previous_file_and_names_the_one_it_could_not_write(name, write, library, fails,
                                                                                  tmp_path, monkeypatch):
    path = tmp_path / name
    path.write_bytes(b"the previous version")
    files.append_line(tmp_path / "log.jsonl", json.dumps({"step": 1, "loss": 2.0, "loss_rec": 1.0, "loss_con": 3.0}))
    monkeypatch.setattr(*library, fails)
    with pytest.raises(files.WriteError, match=rf"could not write {re.escape(str(path))} \(No space left on device"):
        write(path)
    monkeypatch.undo()
    if name != "images.npy":  # a new cache's store has no previous version
        assert path.read_bytes() == b"the previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name, "log.jsonl"})


class FullDiskFile:
    """A log opened for appending on a disk that fills: half of what is written gets there, then ENOSPC."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[:len(data) // 2])
        disk_full()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


def test_a_full_disk_during_a_log_append_leaves_whole_lines_only(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    files.append_line(log, '{"step": 1}')
    monkeypatch.setattr(files, "open", lambda *args, **kwargs: FullDiskFile(open(*args, **kwargs)), raising=False)
    with pytest.raises(files.WriteError, match=rf"could not write {re.escape(str(log))} \(No space left"):
        files.append_line(log, '{"step": 2}')
    assert log.read_text() == '{"step": 1}\n'


def test_a_full_disk_while_training_stops_with_the_file_named_and_the_run_resumes(synthetic_root, tmp_path,
                                                                                  monkeypatch, capsys):
    real_save, saves = torch.save, Counter()

    def save_until_the_disk_fills(state, path):
        saves["calls"] += 1
        if saves["calls"] == 2:  # the second checkpoint: torch's zip writer fails as on a full disk
            Path(path).write_bytes(b"PK half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        real_save(state, path)

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert train.main(run_args(synthetic_root, out, "--no-eval")) == 2
    assert f"could not write {out / 'checkpoint.pt'} (torch.save failed" in capsys.readouterr().err
    monkeypatch.undo()
    assert files.read_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert not list(out.glob(".*.tmp")) and not (out / "run.lock").exists()
    assert train.main(["--resume", str(out / "checkpoint.pt"), "--out-dir", str(out), "--num-workers", "0",
                       "--no-eval"]) == 0
    assert [r["step"] for r in files.read_log(out / "log.jsonl")] == list(range(2, 17, 2))  # 16 steps


# ----------------------------------------------------------------------------------------------------------
# Damaged files read back

def damaged_copies(folder: Path, source: Path) -> dict[str, Path]:
    whole = source.read_bytes()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF  # inside a tensor's bytes: only the zip's CRC-32 notices
    copies = {"cut short": whole[:len(whole) // 2], "empty": b"", "a flipped byte": bytes(flipped)}
    for what, content in copies.items():
        (folder / f"{what}.pt").write_bytes(content)
    return {what: folder / f"{what}.pt" for what in copies}


def test_a_damaged_checkpoint_is_named_with_what_is_wrong(tmp_path):
    torch.save({"model": {"w": torch.arange(10_000.0)}, "step": 3}, tmp_path / "good.pt")
    expected = {"cut short": r"cut short \(\d+ bytes\): it starts as torch.save's zip archive",
                "empty": "the file is empty", "a flipped byte": "damaged: .* fails its checksum"}
    for what, path in damaged_copies(tmp_path, tmp_path / "good.pt").items():
        with pytest.raises(ValueError, match=rf"--resume {re.escape(str(path))}: {expected[what]}.*earlier copy"):
            files.read_checkpoint(path, "--resume")
    assert files.read_checkpoint(tmp_path / "good.pt")["step"] == 3


def test_a_log_cut_short_by_a_kill_loses_its_last_line_only_and_says_so(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert files.read_log(log) == [{"step": 1}, {"step": 2}]
    assert f"{log}: dropped its last line" in capsys.readouterr().err
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))}, line 2: not a JSON record"):
        files.read_log(log)


def test_a_damaged_cache_record_is_named_not_a_parser_message(synthetic_root, tmp_path, capsys):
    argv = ["cache", "--root", str(synthetic_root), "--size", "16", "--workers", "0", "--out", str(tmp_path)]
    assert data.main(argv) == 0
    (tmp_path / "progress.json").write_text('{"done": 1')
    assert data.main(argv) == 2
    assert f"{tmp_path / 'progress.json'}: not valid JSON" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cut_short_checkpoint(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged")
    torch.set_num_threads(1)
    train.main(run_args(synthetic_root, folder / "run", "--no-eval", "--stop-after-steps", "1"))
    return damaged_copies(folder, folder / "run" / "checkpoint.pt")["cut short"]


@pytest.mark.parametrize("entry", ["train --resume", "train --init", "finetune --ckpt", "eval --ckpt", "maco.load"])
def test_every_way_to_read_a_checkpoint_names_a_damaged_file(entry, cut_short_checkpoint, synthetic_root, tmp_path,
                                                             capsys):
    bad = str(cut_short_checkpoint)
    mains = {"train --resume": lambda: train.main(["--resume", bad, "--out-dir", str(tmp_path)]),
             "train --init": lambda: train.main(run_args(synthetic_root, tmp_path, "--init", bad)),
             "finetune --ckpt": lambda: finetune.main(["--ckpt", bad, "--root", str(synthetic_root),
                                                       "--out-dir", str(tmp_path)]),
             "eval --ckpt": lambda: eval_zeroshot.main(["--ckpt", bad, "--root", str(synthetic_root),
                                                        "--out", str(tmp_path)])}
    if entry == "maco.load":
        with pytest.raises(ValueError, match=rf"{re.escape(bad)}: cut short .*earlier copy"):
            maco.load(bad)
        return
    assert mains[entry]() == 2
    error = capsys.readouterr().err
    assert f"{bad}: cut short" in error and "earlier copy" in error, error
