"""finetune.py, segment.py and detect.py continue a table after a kill (docs/reliability.md §2): SIGKILLed inside
each of their writers and at random instants, then rerun with the same command, each ends with exactly the
uninterrupted table (metrics, weights, test outputs); SIGTERM writes the state, prints the command that continues
and exits 143; a changed setting on the same --out-dir is an error naming its flag.
Replay: MACO_FAULT_KILLS (random instants per script, default 1), MACO_FAULT_SEED (default 0)."""

import json
import os
import random
import shlex
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_runs import assert_equal_states, in_child, one_thread  # noqa: F401 (autouse)
from test_fault_injection import TEMPORARY, die_inside
from test_finetune import write_train_checkpoint

import detect
import finetune
import segment
from util.resume import as_floats

KILLS = int(os.environ.get("MACO_FAULT_KILLS", "1"))
FAULT_SEED = int(os.environ.get("MACO_FAULT_SEED", "0"))
TIMING = {"seconds", "wall_seconds", "weights"}  # the timings, and the path of the weights (compared below)


def table_args(script: str, root, ckpt, out) -> list[str]:
    """A short synthetic table: one label fraction, the checkpoint against a random encoder (and for finetune.py
    its two modes), a resumable state every 2 steps."""
    common = ["--root", str(root), "--ckpt", str(ckpt), "--steps", "4", "--warmup-steps", "1", "--eval-interval", "2",
              "--batch-size", "4", "--n-boot", "20", "--state-interval", "2", "--out-dir", str(out)]
    return {"segment": ["--recipe", "synthetic-100", "--head-channels", "8", "--aux-channels", "4", "--overlays", "2",
                        *common],
            "detect": ["--recipe", "synthetic-100", "--pyramid-channels", "8", "--box-head-width", "16", "--proposals",
                       "20", "--pre-nms-train", "20", "--rois-per-image", "8", "--examples", "2", *common],
            "finetune": ["--recipe", "synthetic-10", "--probe-steps", "4", "--probe-warmup-steps", "1", *common]}[script]


SCRIPTS = {"segment": segment.main, "detect": detect.main, "finetune": finetune.main}
# (kind, file, occurrence): a SIGKILL inside the occurrence-th write of that file, half of it written
WRITERS = {"segment": ["settings.json", "state.pt", "best.pt", "test_outputs.npz", "overlays.png", "overlays.npz",
                       "result.json", "metrics.json", "examples.npz", "segmentation.png"],
           "detect": ["settings.json", "state.pt", "best.pt", "test_outputs.npz", "result.json", "metrics.json",
                      "detection.png"],
           "finetune": ["settings.json", "state.pt", "best.pt", "test_outputs.npz", "roc_curves.png", "result.json",
                        "metrics.json", "label_efficiency.png"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "maco.pt"
    write_train_checkpoint(path)
    return path


def table(out: Path) -> dict:
    """What a table is: metrics.json without its timings, every weights file and every test output."""
    metrics = json.loads((out / "metrics.json").read_text())
    runs = [{k: v for k, v in run.items() if k not in TIMING} for run in metrics["runs"]]
    weights = {str(p.relative_to(out)): {k: v for k, v in torch.load(p, weights_only=True).items()
                                         if k in ("segmenter", "detector", "classifier", "step")}  # not the settings
               for p in sorted(out.rglob("best.pt"))}
    outputs = {str(p.relative_to(out)): dict(np.load(p)) for p in sorted(out.rglob("test_outputs.npz"))}
    return dict(runs=runs, weights=weights, outputs=outputs)


def assert_same_table(out: Path, reference: dict) -> None:
    ours = table(out)
    assert ours["runs"] == reference["runs"]
    assert_equal_states(ours["weights"], reference["weights"], "weights")
    assert ours["outputs"].keys() == reference["outputs"].keys()
    for name, arrays in ours["outputs"].items():
        for key, value in arrays.items():
            assert np.array_equal(value, reference["outputs"][name][key]), (name, key)
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob("state.pt")) and not (out / "run.lock").exists()


def landed(out: Path) -> str:
    """Where a kill landed, judged from what it left behind."""
    temporaries = sorted({TEMPORARY.match(p.name).group(1) for p in out.rglob(".*.tmp") if TEMPORARY.match(p.name)})
    if temporaries:
        return "inside the write of " + ", ".join(temporaries)
    states = [torch.load(p, weights_only=True)["step"] for p in out.rglob("state.pt")]
    finished = len(list(out.rglob("result.json")))
    return f"{finished} run(s) finished" + (f", one at step {states[0]}" if states else "")


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_table_killed_at_any_instant_continues_to_the_uninterrupted_one(script, synthetic_root, checkpoint,
                                                                          tmp_path):
    main = SCRIPTS[script]
    reference_dir = tmp_path / "reference"
    status, seconds = in_child(lambda: main(table_args(script, synthetic_root, checkpoint, reference_dir)))
    assert status == 0
    reference = table(reference_dir)
    rng = random.Random(FAULT_SEED)
    kills = [("inside", ("write", name, 1)) for name in WRITERS[script]] + [("inside", ("write", "state.pt", 2))]
    kills += [("at", rng.uniform(0, seconds)) for _ in range(KILLS)]
    where = Counter()
    for number, (how, when) in enumerate(kills):
        out = tmp_path / f"kill{number}"
        args = table_args(script, synthetic_root, checkpoint, out)
        if how == "inside":
            status, _ = in_child(lambda: die_inside(*when) or main(args))
            assert os.WIFSIGNALED(status), f"{script}: {when} was never written"
        else:
            status, _ = in_child(lambda: main(args), kill_after=when)
        where[landed(out) if os.WIFSIGNALED(status) else "finished before the kill"] += 1
        assert main(args) == 0  # the same command again continues the table
        assert_same_table(out, reference)
    print(f"{script}: {len(kills)} kills (seed {FAULT_SEED}, the uninterrupted table took {seconds:.1f} s); "
          f"where they landed: {dict(where)}")


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sigterm_writes_the_state_and_prints_the_command_that_continues(script, synthetic_root, checkpoint,
                                                                         tmp_path, capfd, monkeypatch):
    main = SCRIPTS[script]
    assert main(table_args(script, synthetic_root, checkpoint, tmp_path / "reference")) == 0
    reference = table(tmp_path / "reference")
    out = tmp_path / "stopped"
    steps = Counter()
    real_clip = torch.nn.utils.clip_grad_norm_ if script == "finetune" else None
    real_step = torch.optim.AdamW.step

    def step_then_signal(*args, **kwargs):  # the 3rd optimizer step sends SIGTERM to its own process
        steps["n"] += 1
        if steps["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return (real_clip or real_step)(*args, **kwargs)
    if script == "finetune":
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", step_then_signal)
    else:
        monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    capfd.readouterr()
    assert main(table_args(script, synthetic_root, checkpoint, out)) == 128 + signal.SIGTERM
    printed = capfd.readouterr().out
    assert "stopped at step 3" in printed and len(list(out.rglob("state.pt"))) == 1
    command = shlex.split(printed.split("continue with: ")[1].splitlines()[0])
    assert command[:2] == ["python", f"{script}.py"]
    monkeypatch.undo()
    assert main(command[2:]) == 0
    assert_same_table(out, reference)


def test_a_changed_setting_on_the_same_out_dir_names_its_flag(synthetic_root, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--root", str(synthetic_root), "--scratch", "--steps", "0", "--n-boot", "5", "--overlays", "0",
            "--out-dir", str(out)]
    assert segment.main(["--recipe", "synthetic-1", *args]) == 0
    assert segment.main(["--recipe", "synthetic-1", "--seed", "1", *args]) == 2
    assert "synthetic-1/scratch holds a run with --seed 0, not 1" in capsys.readouterr().err
    assert segment.main(["--recipe", "synthetic-1", "--seed", "1", "--fresh", *args]) == 0  # --fresh starts over
    assert json.loads((out / "synthetic-1" / "scratch" / "settings.json").read_text())["seed"] == 1
    capsys.readouterr()
    # a table that holds the run finds it finished; a session setting may change
    assert segment.main(["--recipe", "synthetic", "--seed", "1", "--progress-interval", "5", *args]) == 0
    printed = capsys.readouterr().out
    assert "synthetic-1 scratch: finished earlier" in printed and "synthetic-10 scratch: finished" not in printed


def test_as_floats_reads_back_the_losses_added_since_its_last_call_in_place():
    losses = [torch.tensor(0.5), torch.tensor(1.25, dtype=torch.bfloat16)]
    assert as_floats(losses) is losses and losses == [0.5, 1.25]
    assert all(type(loss) is float for loss in losses)
    third = torch.tensor(1 / 3)
    losses.append(third)
    as_floats(losses)
    assert losses == [0.5, 1.25, float(third)] and type(losses[2]) is float  # float32's value, as float(tensor)
    assert as_floats([]) == [] and as_floats([2.0]) == [2.0]
