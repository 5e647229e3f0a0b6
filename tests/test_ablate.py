"""ablate.py: the linear probe, paired bootstrap differences, clear errors, and the --quick wiring end to end."""

import json

import numpy as np
import pytest

from tools import ablate
from util.metrics import roc_auc


def test_the_logistic_probe_finds_a_linearly_separable_finding():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 20))
    y = np.stack([(x[:, 3] + 0.5 * x[:, 7] > 0), (x[:, 0] < -0.5)], axis=1).astype(float)  # two findings
    probabilities = ablate.logistic_probe(x[:300], y[:300], x[300:])
    assert probabilities.shape == (100, 2) and ((probabilities > 0) & (probabilities < 1)).all()
    assert roc_auc(y[300:, 0], probabilities[:, 0]) > 0.97 and roc_auc(y[300:, 1], probabilities[:, 1]) > 0.97


def fake_run(labels, zero_shot, probe, pointing):
    """Scores of one (variant, seed) as score_variant stores them: one grounding pair per test image."""
    paths = [f"img{i}.jpg" for i in range(len(labels))]
    pairs = [{"path": path, "pointing_game": float(p), "miou": float(p) / 2, "cnr": float(p)}
             for path, p in zip(paths, pointing)]
    return {"labels": labels.tolist(), "zero_shot": zero_shot.tolist(), "probe": probe.tolist(), "test_paths": paths,
            "grounding": {row: pairs for row in ablate.GROUNDING_ROWS}}


def test_paired_differences_are_zero_for_identical_variants_and_positive_for_a_better_one():
    rng = np.random.default_rng(1)
    labels = (rng.random((120, 2)) < 0.4).astype(float)
    noisy = labels + rng.normal(0, 1.0, labels.shape)
    clean = labels + rng.normal(0, 0.3, labels.shape)
    pointing = rng.random(120) < 0.5
    scores = {"clip": [fake_run(labels, noisy, noisy, pointing)],
              "mim+clip": [fake_run(labels, noisy, noisy, pointing)],
              "maco": [fake_run(labels, clean, clean, pointing | (rng.random(120) < 0.5))]}
    summary = ablate.summarise(scores, n_boot=200)
    same = summary["differences"]["mim+clip - clip"]
    assert same["zero_shot_auc"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    better = summary["differences"]["maco - clip"]
    assert better["zero_shot_auc"]["value"] > 0.1 and better["zero_shot_auc"]["ci95"][0] > 0
    assert better["true_pointing_game"]["ci95"][0] > 0  # maco points right on a superset of the images
    point = summary["variants"]["maco"]["zero_shot_auc"]
    assert point["ci95"][0] <= point["value"] <= point["ci95"][1]
    assert point["value"] == pytest.approx(np.mean([roc_auc(labels[:, c], clean[:, c]) for c in range(2)]))


@pytest.mark.parametrize("argv, message", [
    (["--variants", "clip,simclr"], "unknown ['simclr']"),
    (["--seeds", "0"], "--seeds 0: must be >= 1"),
    (["--variants", ","], "--variants ','"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    assert ablate.main(argv + ["--out-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_ablation_writes_every_output_and_a_second_run_trains_nothing(tmp_path, monkeypatch):
    out = tmp_path / "ablation"
    assert ablate.main(["--quick", "--out-dir", str(out), "--n-boot", "20", "--num-workers", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"clip", "maco"} and "maco - clip" in results["differences"]
    for variant in ("clip", "maco"):
        metrics = results["variants"][variant]
        assert {"zero_shot_auc", "probe_auc", "true_pointing_game", "swapped_pointing_game"} <= set(metrics)
    assert (out / "ablation_table.md").read_text().count("|") > 20 and (out / "ablation.png").stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished (variant, seed) was trained again")

    monkeypatch.setattr(ablate, "train", no_training)
    docs = tmp_path / "docs"  # the README's copy is drawn from the finished runs, only when asked for
    assert ablate.main(["--quick", "--out-dir", str(out), "--n-boot", "20", "--docs-dir", str(docs)]) == 0
    assert (docs / "ablation_table.md").read_text() == (out / "ablation_table.md").read_text()
    assert (docs / "ablation.png").stat().st_size > 0
