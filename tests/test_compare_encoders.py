"""tools/compare_encoders.py: paired differences of two encoders' test metrics, pooled over seeds, from the
per-image outputs the scripts save; hand-made runs whose differences are known."""
import json

import numpy as np
import pytest

from tools import compare_encoders as ce
from util.checkpoint import write_arrays
from util.metrics import dice_scores


def write_runs(folder, seed: int, outputs: dict, task: str = "segment"):
    """A script's --out-dir: metrics.json naming each run's best.pt, and test_outputs.npz beside it."""
    runs = []
    for (init, fraction), arrays in outputs.items():
        run_dir = folder / f"synthetic-{100 * fraction:g}" / init
        write_arrays(run_dir / "test_outputs.npz", arrays)
        runs.append(dict(init=init, label_fraction=fraction, weights=str(run_dir / "best.pt"),
                         **({"mode": "finetune"} if task == "finetune" else {})))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(dict(config=dict(seed=seed), runs=runs)))


def test_segmentation_differences_are_paired_and_averaged_over_seeds(tmp_path, capsys):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 50, 40) * (rng.random(40) < 0.5)  # (40,) true pixels, half the images negative
    def counts(hit):  # a model that finds `hit` of each true mask and adds 2 false pixels per image
        found = np.floor(hit * truth).astype(np.int64)
        return np.stack([found, found + 2, truth], axis=1)
    for seed, (good, bad) in enumerate(((0.9, 0.5), (0.8, 0.6))):
        write_runs(tmp_path / f"s{seed}", seed, {("maco", 1.0): dict(counts=counts(good)),
                                                 ("scratch", 1.0): dict(counts=counts(bad))})
    assert ce.main(["--task", "segment", "--runs", f"{tmp_path / 's0'},{tmp_path / 's1'}", "--n-boot", "200",
                    "--out", str(tmp_path / "out.json")]) == 0
    row = json.loads((tmp_path / "out.json").read_text())["pairs"]["maco:scratch"][0]
    expected = [dice_scores(counts(g))["pooled_dice"] - dice_scores(counts(b))["pooled_dice"]
                for g, b in ((0.9, 0.5), (0.8, 0.6))]
    assert row["seeds"] == [0, 1] and row["pooled_dice"]["per_seed"] == pytest.approx(expected)
    assert row["pooled_dice"]["difference"] == pytest.approx(np.mean(expected))
    low, high = row["pooled_dice"]["ci95"]
    assert 0 < low <= row["pooled_dice"]["difference"] <= high
    assert "maco - scratch" in capsys.readouterr().out


def test_identical_encoders_differ_by_exactly_zero_in_every_resample(tmp_path):
    labels = np.array([[0, 1], [1, 0], [1, 1], [0, 0]] * 10, dtype=np.float32)
    scores = np.random.default_rng(1).random(labels.shape).astype(np.float32)
    same = dict(labels=labels, scores=scores)
    write_runs(tmp_path / "a", 0, {("maco", 0.1): same, ("scratch", 0.1): same}, task="finetune")
    runs = ce.collect([str(tmp_path / "a")], "finetune", "finetune")
    row = ce.compare(runs, "maco", "scratch", "finetune", n_boot=50, seed=0)[0]
    assert row["macro_auc"]["difference"] == 0 and row["macro_auc"]["ci95"] == [0, 0]


def test_named_out_dirs_compare_runs_of_different_checkpoints_and_unknown_names_are_clear_errors(tmp_path, capsys):
    boxes = dict(boxes=np.array([[0, 0, 10, 10.]]), scores=np.array([0.9]), box_image=np.array([0]),
                 truths=np.array([[0, 0, 10, 10.], [20, 20, 30, 30]]), truth_image=np.array([0, 1]),
                 n_images=np.array(2))
    missed = dict(boxes, boxes=np.array([[40, 40, 50, 50.]]))
    write_runs(tmp_path / "clip", 0, {("maco", 0.1): missed}, task="detect")
    write_runs(tmp_path / "maco", 0, {("maco", 0.1): boxes}, task="detect")
    runs = f"clip={tmp_path / 'clip'},maco={tmp_path / 'maco'}"
    assert ce.main(["--task", "detect", "--runs", runs, "--compare", "maco:clip", "--n-boot", "20",
                    "--out", str(tmp_path / "out.json")]) == 0
    row = json.loads((tmp_path / "out.json").read_text())["pairs"]["maco:clip"][0]
    assert row["ap50"]["a"] == pytest.approx(0.5, abs=0.01) and row["ap50"]["b"] == 0  # one of two boxes found
    assert ce.main(["--task", "detect", "--runs", runs, "--compare", "maco:mae"]) == 2
    assert "the runs have the encoders clip, maco" in capsys.readouterr().err
