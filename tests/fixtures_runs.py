"""Tiny training runs and forked child processes for the reliability tests (test_fault_injection.py,
test_reliability.py). Everything runs on one thread, so a forked child and its parent compute bit-identical
numbers, and forking after torch has run is safe."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from util.checkpoint import read_log

# a run small enough to be killed many times: on the 160-study world, 16 steps, 4 checkpoints, 8 log lines, the
# plot and the evaluation
TINY_MODEL = ["--depth", "1", "--decoder-depth", "1", "--text-depth", "1", "--vocab-size", "300"]


def run_args(root, out, *extra):
    return ["--root", str(root), "--out-dir", str(out), "--batch-size", "8", "--epochs", "1", "--num-workers", "0",
            "--log-interval", "2", "--ckpt-interval", "4", *TINY_MODEL, *extra]


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-identical numbers in a forked child and its parent, and a safe fork (autouse where imported)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    return [{k: v for k, v in record.items() if k != "images_per_s"} for record in read_log(out / "log.jsonl")]
