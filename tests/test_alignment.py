"""The alignment study (tools/alignment.py): its text groups by hand, its wiring end to end."""

import json

import numpy as np
import pytest

from tools import alignment


def test_text_groups_are_the_connected_findings_at_or_above_the_threshold():
    names = ["a", "b", "c", "d", "e"]
    cosine = np.eye(5)
    cosine[0, 1] = cosine[1, 0] = 0.99  # a-b
    cosine[1, 2] = cosine[2, 1] = 0.985  # b-c: a, b and c are one group through b
    cosine[3, 4] = cosine[4, 3] = 0.97  # below the threshold
    assert alignment.text_groups(cosine, names) == [["a", "b", "c"]]
    assert alignment.text_groups(cosine, names, threshold=0.95) == [["a", "b", "c"], ["d", "e"]]


@pytest.mark.parametrize("argv, message", [
    (["--factors", "default,bigger"], "unknown ['bigger']"),
    (["--eval-seeds", "1,x"], "comma-separated integers"),
    (["--redraw"], "no finished (factor, seed)"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    assert alignment.main(argv + ["--out-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_study_scores_both_readouts_on_held_out_worlds_and_a_redraw_trains_nothing(tmp_path, monkeypatch):
    out = tmp_path / "study"
    argv = ["--quick", "--out-dir", str(out), "--n-boot", "20", "--factors", "default,positive+no-false-negatives"]
    assert alignment.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_test_images"] > 0 and set(results["variants"]) == {"default", "positive+no-false-negatives"}
    metrics = results["variants"]["default"]
    for key in alignment.TABLE_COLUMNS:
        assert key in metrics, key
    assert "positive+no-false-negatives - default" in results["differences"]
    details = results["details"]["default"]
    assert len(details["text_cosine"]) == len(details["text_names"]) == 8 and details["effective_rank"] >= 1
    (seed0,) = details["per_seed"]  # one seed: its own values are the factor's
    assert all(seed0[key] == pytest.approx(metrics[key]["value"]) for key in alignment.PER_SEED_COLUMNS)
    assert (out / "alignment.png").stat().st_size > 0 and "| default | 1 |" in (out / "alignment_table.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished (factor, seed) was trained again")

    monkeypatch.setattr(alignment, "train", no_training)
    docs = tmp_path / "docs"
    assert alignment.main(argv + ["--redraw", "--docs-dir", str(docs)]) == 0
    assert (docs / "alignment_table.md").read_text() == (out / "alignment_table.md").read_text()
