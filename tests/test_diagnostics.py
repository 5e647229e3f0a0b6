"""diagnostics.py: why a checkpoint grounds or not (text separation, alignment, prior, probe, geometry, words alone)."""
import math

import pytest
import torch

from test_eval_zeroshot import tiny_model  # noqa: F401 (a fixture)
from tools import diagnostics
from util import eval_datasets


def test_diagnostics_measure_text_alignment_prior_probe_and_geometry(synthetic_root, tiny_model):
    model, tokenizer = tiny_model
    result = diagnostics.diagnose(model, tokenizer, synthetic_root, verbose=False)
    categories = list(result["finding_sentences"])
    assert len(result["sentence_cosine"]) == len(categories) and result["sentence_cosine"][0][0] == pytest.approx(1.0, abs=1e-5)
    # an untrained correlation head is zero: a uniform prior covers every patch
    assert result["prior"]["exp_entropy"] == pytest.approx(model.cfg.num_patches)
    assert result["prior"]["inverse_simpson"] == pytest.approx(model.cfg.num_patches)
    assert result["alignment"]["n_pairs"] > 0 and math.isfinite(result["alignment"]["margin_true"])
    assert all(0.0 <= row["position_all"] <= 1.0 for row in result["probe"].values())
    assert 0 < result["geometry"]["effective_rank"] <= model.cfg.embed_dim
    assert "effective rank" in diagnostics.format_diagnosis(result)


def test_patch_box_fraction_is_the_share_of_each_patch_inside_the_box():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[0:4, 0:2] = True  # half of the top-left 4 x 4 patch
    fraction = diagnostics.patch_box_fraction(mask, 4)
    assert fraction[0] == pytest.approx(0.5) and fraction[1:].sum() == 0


def test_words_alone_reference_points_into_boxes_of_a_fixed_place_and_not_with_the_swapped_category():
    # Edema always in the same box at the top left, Mass always at the bottom right, on alternating images:
    # a map of each category's usual location points into its box, the other category's map never does
    pair = lambda path, category, box: eval_datasets.GroundingPair(path, f"some {category}", category, [box], 64, 64)  # noqa: E731
    pairs = []
    for image in range(6):
        pairs.append(pair(f"img{image}", "Edema", (2, 2, 10, 10)))
        pairs.append(pair(f"img{image}", "Mass", (40, 44, 12, 12)))
    result = diagnostics.location_reference(pairs, 64)
    assert result["true"]["pointing_game"] == 1.0 and result["true"]["miou"] > 0.9
    assert result["swapped"]["pointing_game"] == 0.0 and result["swapped"]["cnr"] < 0


def test_the_specificity_figure_is_written(tmp_path, synthetic_root, tiny_model):  # noqa: F811
    model, tokenizer = tiny_model
    pairs = eval_datasets.load_ms_cxr(synthetic_root / eval_datasets.MS_CXR_CSV, synthetic_root)
    diagnostics.plot_phrase_specificity(model, tokenizer, pairs[:12], tmp_path / "maps.png")
    assert (tmp_path / "maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert diagnostics.main(["--ckpt", str(tmp_path / "missing.pt"), "--root", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert diagnostics.main(["--root", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
