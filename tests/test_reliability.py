"""Reliability (docs/reliability.md): a run killed at any instant resumes to exactly the uninterrupted result;
SIGTERM and Ctrl-C write a checkpoint and exit; one run per output folder; a full disk loses nothing; a damaged
checkpoint is an error naming the file.

The kills are real SIGKILLs of forked child processes (fork: no second import of torch per kill). Everything here
runs on one thread, so the child and the parent compute bit-identical numbers and forking is safe.
Replay: MACO_FAULT_KILLS (default 20), MACO_FAULT_SEED (default 0), or MACO_FAULT_AT="1.5,2.25" (seconds).
"""

import errno
import json
import os
import random
import re
import shutil
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
from matplotlib.figure import Figure

import data
import eval_zeroshot
import finetune
import maco
import train
from tools import ablate
from util import checkpoint as files
from util.run_guard import OutDirLock, StopSignals

KILLS = int(os.environ.get("MACO_FAULT_KILLS", "20"))
FAULT_SEED = int(os.environ.get("MACO_FAULT_SEED", "0"))
# a run small enough to be killed many times: 16 steps, 4 checkpoints, 8 log lines, the plot and the evaluation
TINY_MODEL = ["--depth", "1", "--decoder-depth", "1", "--text-depth", "1", "--vocab-size", "300"]
# (kind, file, occurrence): kill the run inside the occurrence-th write of that file, half of it written (or at
# the start of the occurrence-th optimizer step)
TARGETED = [("step", "train_step", 7), ("write", "checkpoint.pt", 1), ("write", "checkpoint.pt", 2),
            ("write", "checkpoint.pt", 3), ("append", "log.jsonl", 3), ("write", "loss.png", 1),
            ("write", "roc_curves.png", 1), ("write", "grounding_000.png", 1), ("write", "metrics.json", 1)]


def run_args(root, out, *extra):
    return ["--root", str(root), "--out-dir", str(out), "--batch-size", "8", "--epochs", "1", "--num-workers", "0",
            "--log-interval", "2", "--ckpt-interval", "4", *TINY_MODEL, *extra]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def die_inside(kind: str, name: str, occurrence: int) -> None:
    """In a child: make the occurrence-th write ('write': write_atomic's rename; 'append': a log line) of the
    file `name` a SIGKILL with half of its bytes written; or ('step') the start of the occurrence-th step."""
    calls, real_replace, real_append, real_step = Counter(), os.replace, train.append_line, train.train_step

    def hit(path) -> bool:
        calls[Path(path).name] += Path(path).name == name
        return Path(path).name == name and calls[name] == occurrence

    def replace(source, target):
        if kind == "write" and hit(target):
            os.truncate(source, os.path.getsize(source) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target)

    def append_line(path, line):
        if kind == "append" and hit(path):
            with open(path, "ab") as log:
                log.write(line.encode()[:len(line) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_append(path, line)

    def train_step(run, step, batches):
        if kind == "step" and hit("train_step"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(run, step, batches)

    os.replace, train.append_line, train.train_step = replace, append_line, train_step


def in_child(work, kill_after: float | None = None) -> tuple[int, float]:
    """Run work() in a forked child (output discarded); SIGKILL it after kill_after seconds if it still runs.
    Returns (wait status, seconds)."""
    start = time.time()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            code = work()
        finally:
            os._exit(code or 0)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, time.time() - start
        if kill_after is not None and time.time() - start >= kill_after:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1], time.time() - start
        time.sleep(0.005)


TEMPORARY = re.compile(r"^\.(.+)\.(\d+)\.[^.]+\.tmp$")  # write_atomic's temporary of <name>


def killed_where(out: Path, total_steps: int = 16) -> str:
    """Where the kill landed, judged from what it left behind."""
    temporaries = sorted({TEMPORARY.match(p.name).group(1) for p in out.rglob(".*.tmp") if TEMPORARY.match(p.name)})
    log, ckpt = out / "log.jsonl", out / "checkpoint.pt"
    if temporaries:
        return "inside the write of " + ", ".join(temporaries)
    if log.exists() and log.read_bytes() and not log.read_bytes().endswith(b"\n"):
        return "inside a log append"
    if not ckpt.exists():
        return "set-up or steps before the first checkpoint"
    step = torch.load(ckpt, weights_only=True)["step"]
    if step < total_steps:
        return "steps"
    if not (out / "loss.png").exists():
        return "final checkpoint written, before the plot"
    return "evaluation" if not (out / "eval" / "metrics.json").exists() else "evaluation files"


def resume_after_kill(root, out: Path) -> None:
    """What a user does after a kill: --resume the checkpoint if there is one, else start again."""
    ckpt = out / "checkpoint.pt"
    argv = (["--resume", str(ckpt), "--out-dir", str(out), "--num-workers", "0"] if ckpt.exists()
            else run_args(root, out, "--overwrite"))
    assert train.main(argv) == 0, argv


def assert_equal_states(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_states(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, where


def losses(out: Path) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "images_per_s"} for record in files.read_log(out / "log.jsonl")]


def assert_same_run(out: Path, reference: Path) -> None:
    """The weights, optimizer state, step and log losses are exactly the reference's; so is the evaluation; and
    nothing of the kill is left behind."""
    ours, theirs = (torch.load(path / "checkpoint.pt", weights_only=True) for path in (out, reference))
    for key in ("model", "optimizer", "step"):
        assert_equal_states(ours[key], theirs[key], key)
    assert losses(out) == losses(reference)
    ours, theirs = (json.loads((path / "eval" / "metrics.json").read_text()) for path in (out, reference))
    assert (ours["zero_shot"], ours["grounding"]) == (theirs["zero_shot"], theirs["grounding"])
    assert (out / "loss.png").stat().st_size > 0
    assert not list(out.rglob(".*.tmp")) and not (out / "run.lock").exists()


@pytest.mark.slow
def test_a_run_killed_at_any_instant_resumes_to_the_uninterrupted_result(synthetic_root, tmp_path):
    start = time.time()
    reference = tmp_path / "reference"
    status, seconds = in_child(lambda: train.main(run_args(synthetic_root, reference)))
    assert status == 0
    chosen = os.environ.get("MACO_FAULT_AT")
    rng = random.Random(FAULT_SEED)
    instants = ([float(s) for s in chosen.split(",")] if chosen else
                [rng.uniform(0, seconds) for _ in range(max(0, KILLS - len(TARGETED)))])
    kills = [] if chosen else [("inside", target) for target in TARGETED]
    kills += [("at", instant) for instant in instants]
    where = Counter()
    for number, (how, when) in enumerate(kills):
        out = tmp_path / f"kill{number}"
        print(f"kill {number}: {how} {when} (seed {FAULT_SEED}; the uninterrupted run took {seconds:.2f} s)")
        if how == "inside":
            status, _ = in_child(lambda: die_inside(*when) or train.main(run_args(synthetic_root, out)))
        else:
            status, _ = in_child(lambda: train.main(run_args(synthetic_root, out)), kill_after=when)
        landed = "finished before the kill" if os.WIFEXITED(status) else killed_where(out)
        assert os.WIFSIGNALED(status) or (how == "at" and os.WEXITSTATUS(status) == 0)  # each writer is hit
        where[landed] += 1
        print(f"  landed: {landed}")
        resume_after_kill(synthetic_root, out)
        assert_same_run(out, reference)
        shutil.rmtree(out)  # 12 MB a kill
    # a resumed run killed while it trims the log, then resumed again
    out = tmp_path / "killed-twice"
    in_child(lambda: die_inside("write", "checkpoint.pt", 2) or train.main(run_args(synthetic_root, out)))
    resume = ["--resume", str(out / "checkpoint.pt"), "--out-dir", str(out), "--num-workers", "0"]
    status, _ = in_child(lambda: die_inside("write", "log.jsonl", 1) or train.main(resume))
    assert os.WIFSIGNALED(status) and "log.jsonl" in killed_where(out)
    resume_after_kill(synthetic_root, out)
    assert_same_run(out, reference)
    print(f"{len(kills) + 1} kills in {time.time() - start:.0f} s; where they landed: {dict(where)}")


@pytest.mark.slow
def test_a_cache_build_killed_at_any_instant_completes_to_the_same_cache(synthetic_root, tmp_path):
    def build(out):
        return lambda: data.main(["cache", "--root", str(synthetic_root), "--size", "32", "--chunk-size", "16",
                                  "--workers", "0", "--out", str(out)])
    status, seconds = in_child(build(tmp_path / "reference"))
    assert status == 0
    rng = random.Random(FAULT_SEED)
    kills = [("inside", ("write", name, 1)) for name in ("ids.txt", "status.npy", "meta.json", "progress.json")]
    kills += [("inside", ("write", "progress.json", 3))] + [("at", rng.uniform(0, seconds)) for _ in range(5)]
    for number, (how, when) in enumerate(kills):
        out = tmp_path / f"kill{number}"
        print(f"cache kill {number}: {how} {when} (seed {FAULT_SEED})")
        if how == "inside":
            in_child(lambda: die_inside(*when) or build(out)())
        else:
            in_child(build(out), kill_after=when)
        assert data.main(["cache", "--root", str(synthetic_root), "--size", "32", "--chunk-size", "16",
                          "--workers", "0", "--out", str(out)]) == 0
        for name in ("ids.txt", "meta.json", "progress.json", "status.npy", "images.npy"):
            assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
        assert not list(out.glob(".*.tmp")) and not (out / "run.lock").exists()


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
