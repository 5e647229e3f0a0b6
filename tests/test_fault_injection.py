"""A run killed at any instant resumes to exactly the uninterrupted result (docs/reliability.md §1, §3): SIGKILLs of
forked child processes (fork: no second import of torch per kill), inside each writer and at random instants;
the same for `python data.py cache`.
Replay: MACO_FAULT_KILLS (default 20), MACO_FAULT_SEED (default 0), or MACO_FAULT_AT="1.5,2.25" (seconds).
"""

import json
import os
import random
import re
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from fixtures_runs import assert_equal_states, in_child, losses, one_thread, run_args  # noqa: F401 (autouse)

import data
import train
from tools import ablate

KILLS = int(os.environ.get("MACO_FAULT_KILLS", "20"))
FAULT_SEED = int(os.environ.get("MACO_FAULT_SEED", "0"))
# (kind, file, occurrence): kill the run inside the occurrence-th write of that file, half of it written (or at
# the start of the occurrence-th optimizer step)
TARGETED = [("step", "train_step", 7), ("write", "checkpoint.pt", 1), ("write", "checkpoint.pt", 2),
            ("write", "checkpoint.pt", 3), ("append", "log.jsonl", 3), ("write", "loss.png", 1),
            ("write", "roc_curves.png", 1), ("write", "grounding_000.png", 1), ("write", "metrics.json", 1)]


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
        assert build(out)() == 0
        for name in ("ids.txt", "meta.json", "progress.json", "status.npy", "images.npy"):
            assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
        assert not list(out.glob(".*.tmp")) and not (out / "run.lock").exists()


def test_an_ablation_run_killed_before_its_first_checkpoint_starts_again(synthetic_root, tmp_path):
    run_dir = tmp_path / "runs" / "clip-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text('{"step": 2, "loss": 3.0}\n{"st')  # all a kill at step 3 leaves
    cfg = ablate.AblateConfig(quick=True, root=str(synthetic_root), num_workers=0, out_dir=str(tmp_path))
    checkpoint = ablate.train_variant(cfg, "clip", 0, run_dir)
    assert torch.load(checkpoint, weights_only=True)["step"] > 2
