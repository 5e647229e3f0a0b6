"""Zero-shot and grounding evaluation (docs/method.md §8, §9; D9, D10) and the evaluation-set loaders
(docs/datasets.md §1-§6). Hand-computed metric values, reference implementations, real-format fixtures."""
import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

import eval_zeroshot as ez
from fixtures_eval import (
    SIIM_NEGATIVE,
    SIIM_POSITIVE,
    SIIM_RLE,
    SIIM_TWO_REGIONS,
    make_chexpert,
    make_ms_cxr,
    make_nih,
    make_rsna,
    make_siim,
    make_synthetic_labels,
    rewrite_header,
)
from maco import MaCo, MaCoConfig
from util import checkpoint, eval_datasets
from util import metrics as mt
from util.tokenizer import train_tokenizer

CAPTIONS = ["there is cardiomegaly. ", "there is no pleural effusion. ", "no pneumothorax. ", "the lung is clear.",
            "small left pleural effusion. ", "patchy opacity in the right lower lobe. "] * 4


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=200)
    cfg = MaCoConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size())
    return MaCo(cfg).eval(), tokenizer


# ----------------------------------------------------------------------------- AUC, F1, accuracy

def brute_force_auc(labels, scores):
    """Mann-Whitney over all (positive, negative) pairs, ties counting one half: O(n²)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_of_a_perfect_ranking_is_one_and_of_a_reversed_one_is_zero():
    labels, scores = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert mt.roc_auc(labels, scores) == 1.0
    assert mt.roc_auc(labels, -scores) == 0.0


def test_auc_of_a_constant_predictor_is_one_half():
    assert mt.roc_auc([0, 1, 1, 0, 1, 0, 0], np.full(7, 0.3)) == 0.5


def test_auc_counts_tied_pairs_as_one_half_hand_computed():
    # positives 0.8, 0.3, 0.5 vs negatives 0.8, 0.1: pair wins 0.5 + 1 + 0 + 1 + 0 + 1 = 3.5 of 6
    assert mt.roc_auc([1, 0, 1, 0, 1], [0.8, 0.8, 0.3, 0.1, 0.5]) == pytest.approx(3.5 / 6, abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_brute_force_mann_whitney_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes many ties
    assert mt.roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_ignores_nan_labels_and_is_nan_when_one_class_is_absent():
    assert mt.roc_auc([1, np.nan, 0, np.nan], [0.9, 0.0, 0.1, 1.0]) == 1.0
    assert math.isnan(mt.roc_auc([1, 1, 1], [0.2, 0.4, 0.6]))


def test_trapezoid_area_under_roc_curve_equals_auc_with_ties():
    rng = np.random.default_rng(7)
    labels, scores = rng.integers(0, 2, 80), np.round(rng.random(80), 1)
    fpr, tpr = mt.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(mt.roc_auc(labels, scores), abs=1e-12)


def test_f1_and_accuracy_at_one_half_hand_computed():
    labels, scores = [1, 1, 0, 0, 1], [0.9, 0.4, 0.6, 0.2, 0.7]  # predicted 1 0 1 0 1
    assert mt.f1_positive(labels, scores) == pytest.approx(2 / 3)  # TP 2, FP 1, FN 1
    # class-0 F1: TP 1, FP 1, FN 1 -> 1/2; weighted by supports 3 and 2: (3 * 2/3 + 2 * 1/2) / 5
    assert mt.f1_support_weighted(labels, scores) == pytest.approx(0.6)
    assert mt.accuracy(labels, scores) == pytest.approx(0.6)


def test_a_score_of_exactly_one_half_is_predicted_negative_like_the_released_round():
    assert mt.accuracy([0, 1], [0.5, 0.5]) == 0.5
    assert mt.f1_positive([1], [0.5]) == 0.0


def test_bootstrap_interval_is_seeded_and_brackets_the_macro_auc():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (200, 3)).astype(float)
    scores = labels * 0.5 + rng.random((200, 3))
    first = mt.bootstrap_macro_auc_ci(labels, scores, n_boot=200, seed=3)
    assert first == mt.bootstrap_macro_auc_ci(labels, scores, n_boot=200, seed=3)
    assert first[0] < mt.macro_auc(labels, scores) < first[1]
    assert mt.bootstrap_macro_auc_ci(labels, labels, n_boot=50) == (1.0, 1.0)


def test_classification_metrics_report_per_class_and_macro_values():
    labels = np.array([[1, 0], [0, 1], [1, np.nan], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.1, 0.7], [0.8, 0.9], [0.3, 0.6]])
    metrics = mt.classification_metrics(labels, scores, ["a", "b"], n_boot=20)
    assert metrics["per_class"]["a"]["auc"] == 1.0 and metrics["per_class"]["b"]["auc"] == 1.0
    assert metrics["per_class"]["b"]["n_pos"] == 1 and metrics["per_class"]["b"]["n_neg"] == 2
    assert metrics["macro_auc"] == 1.0
    assert metrics["per_class"]["b"]["accuracy"] == pytest.approx(2 / 3)  # 0.6 > 0.5 is a false positive


# ----------------------------------------------------------------------------- Gaussian smoothing

def direct_gaussian_2d(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Reference: one 2-D correlation with the outer-product kernel on a half-sample-reflected input."""
    radius = int(4 * sigma + 0.5)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    kernel = np.outer(taps, taps) / np.outer(taps, taps).sum()
    padded = np.pad(grid, radius, mode="symmetric")  # numpy's 'symmetric' = (d c b a | a b c d | d c b a)
    out = np.zeros_like(grid)
    for i, j in np.ndindex(*grid.shape):
        out[i, j] = np.sum(padded[i:i + 2 * radius + 1, j:j + 2 * radius + 1] * kernel)
    return out


@pytest.mark.parametrize("shape", [(14, 14), (8, 8), (4, 5)])
def test_gaussian_smoothing_equals_direct_2d_convolution_with_reflect_padding(shape):
    grid = np.random.default_rng(0).normal(size=shape)
    smoothed = mt.gaussian_smooth(torch.from_numpy(grid), sigma=1.5).numpy()
    assert np.allclose(smoothed, direct_gaussian_2d(grid, 1.5), atol=1e-12)


def test_gaussian_smoothing_matches_pinned_scipy_gaussian_filter_values():
    # scipy.ndimage.gaussian_filter(np.arange(12.).reshape(3, 4), 1.5), scipy 1.17.1
    expected = [[3.607111248553, 4.033825685217, 4.636485105777, 5.063199542441],
                [4.771955853056, 5.19867028972, 5.80132971028, 6.228044146944],
                [5.936800457559, 6.363514894223, 6.966174314783, 7.392888751447]]
    smoothed = mt.gaussian_smooth(torch.arange(12, dtype=torch.float64).view(3, 4))
    assert np.allclose(smoothed.numpy(), expected, atol=1e-11)


def test_gaussian_smoothing_of_a_batch_smooths_each_map_alone():
    maps = torch.randn(3, 6, 6, dtype=torch.float64)
    batched = mt.gaussian_smooth(maps)
    assert all(torch.allclose(batched[i], mt.gaussian_smooth(maps[i])) for i in range(3))


# ----------------------------------------------------------------------------- CNR, IoU, pointing game

BOX = np.zeros((4, 4), bool)
BOX[:2, :2] = True  # A = the top-left 2x2


def test_cnr_hand_computed_is_signed():
    heat = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [-1, -1, -1, -1], [-1, -1, 0, 0]], float)
    # A: 1 1 0 0 -> mean 1/2, var 1/4; rest: six 0 and six -1 -> mean -1/2, var 1/4; (1/2 + 1/2) / sqrt(1/2)
    assert mt.cnr(heat, BOX) == pytest.approx(math.sqrt(2))
    assert mt.cnr(-heat, BOX) == pytest.approx(-math.sqrt(2))


def test_cnr_is_zero_when_both_regions_are_flat_and_nan_without_a_box():
    heat = np.where(BOX, 1.0, -1.0)
    assert mt.cnr(heat, BOX) == 0.0
    assert math.isnan(mt.cnr(heat, np.zeros((4, 4), bool)))


def test_iou_per_threshold_and_miou_hand_computed():
    heat = np.full((4, 4), -1.0)
    heat[0, 0], heat[0, 1], heat[1, 0], heat[3, 3] = 1.0, 0.3, 0.15, 0.45  # one box pixel stays at -1
    # t=0.1: {1, .3, .15, .45} -> 3/5; 0.2: 2/5; 0.3 (strict >): {1, .45} -> 1/5; 0.4: 1/5; 0.5: {1} -> 1/4
    assert np.allclose(mt.iou_at_thresholds(heat, BOX), [0.6, 0.4, 0.2, 0.2, 0.25])
    assert mt.miou(heat, BOX) == pytest.approx(0.33)


def test_pointing_game_hits_when_any_maximum_lies_in_the_box():
    heat = np.zeros((4, 4))
    heat[3, 3] = 1.0
    assert mt.pointing_game(heat, BOX) == 0.0
    heat[1, 1] = 1.0  # a tie, one inside
    assert mt.pointing_game(heat, BOX) == 1.0


def test_grounding_summary_means_over_pairs_and_over_categories():
    pairs = [dict(category="a", cnr=1.0, abs_cnr=1.0, miou=0.5, iou=[0.5] * 5, pointing_game=1.0),
             dict(category="a", cnr=-1.0, abs_cnr=1.0, miou=0.1, iou=[0.1] * 5, pointing_game=0.0),
             dict(category="b", cnr=2.0, abs_cnr=2.0, miou=0.3, iou=[0.3] * 5, pointing_game=1.0)]
    summary = ez.grounding_summary(pairs)
    assert summary["overall"]["cnr"] == pytest.approx(2 / 3) and summary["overall"]["miou"] == pytest.approx(0.3)
    assert summary["category_mean"]["cnr"] == pytest.approx(1.0)  # (0 + 2) / 2
    assert summary["category_mean"]["pointing_game"] == pytest.approx(0.75)
    assert summary["per_category"]["a"]["n_pairs"] == 2


# ----------------------------------------------------------------------------- boxes, letterbox, RLE

def test_letterbox_box_mapping_hand_computed_for_a_portrait_mimic_image():
    # 2544 x 3056: r = 224/3056, content 186 wide, pad 38 -> left 19; 1402*r = 102.76, 1690*r = 123.87,
    # 610*r = 44.71, 720*r = 52.77
    assert eval_datasets.letterbox_box((1402, 1690, 610, 720), 2544, 3056, 224) == (121, 123, 44, 52)


def test_letterbox_box_mapping_hand_computed_for_a_landscape_image():
    # 300 x 200 -> 30: r = 0.1, content 30 x 20, pad 10 -> top 5
    assert eval_datasets.letterbox_box((10, 20, 50, 40), 300, 200, 30) == (1, 7, 5, 4)


def test_boxes_become_their_union_not_their_sum():
    mask = eval_datasets.boxes_to_mask([(0, 0, 4, 4), (2, 2, 4, 4)], 10, 10, 10)
    assert mask.dtype == bool and mask.sum() == 16 + 16 - 4
    assert mask[0:4, 0:4].all() and mask[2:6, 2:6].all()


def test_letterboxed_box_frame_matches_the_letterboxed_image_of_data_preprocessing():
    from PIL import Image

    from data import IMAGE_MEAN, IMAGE_STD
    pixels = np.zeros((200, 300), np.uint8)  # landscape; a white box x 100..199, y 60..139
    pixels[60:140, 100:200] = 255
    image = eval_datasets.preprocess_image(Image.fromarray(pixels), 60, 1, "letterbox")[0].numpy()
    mask = eval_datasets.boxes_to_mask([(100, 60, 100, 80)], 300, 200, 60)  # r = 0.2, top pad 10 -> rows 22..37
    assert mask.sum() == 20 * 16 and mask[22:38, 20:40].all()
    white, black = (1 - IMAGE_MEAN) / IMAGE_STD, -IMAGE_MEAN / IMAGE_STD
    assert np.allclose(image[23:37, 21:39], white, atol=0.05)  # box interior (edges may blur)
    far = np.ones_like(mask)
    far[21:39, 19:41] = False
    assert np.allclose(image[far], black, atol=0.05)  # background and the zero padding rows


def test_rle_decode_of_a_hand_made_mask_is_column_major_with_relative_starts():
    # height 3, width 4; flat column-major index = x * 3 + y; runs at 1..2 and, 3 later, at 6
    expected = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool)
    assert np.array_equal(eval_datasets.rle_decode("1 2 3 1", height=3, width=4), expected)
    assert eval_datasets.rle_encode(expected) == "1 2 3 1"


def test_rle_of_a_real_siim_row_round_trips_exactly():
    mask = eval_datasets.rle_decode(SIIM_RLE)
    assert mask.shape == (1024, 1024) and mask.sum() == 1 + 7 + 36 + 35 + 35 + 32 + 27 + 20 + 16 + 10
    assert eval_datasets.rle_encode(mask) == SIIM_RLE
    assert not eval_datasets.rle_decode("-1").any() and eval_datasets.rle_encode(np.zeros((5, 5), bool)) == "-1"


# ----------------------------------------------------------------------------- prompts and scoring

def test_prompt_sets_are_the_released_strings_with_lower_cased_class_names():
    default = ez.class_prompts(["Lung Opacity"])["Lung Opacity"]
    assert default == (["There is lung opacity. "],
                       ["the lung is clear.", "There is no lung opacity. ", "no lung opacity. ", "no evidence of lung opacity. "])
    positive, negative = ez.class_prompts(["pneumothorax"], "siim")["pneumothorax"]
    assert positive == ["Abnormal collection of air in the pleural space between the lung and the chest wall. ",
                        "There is pneumothorax. "]
    assert negative[-1] == "The lung parenchyma is homogeneous, and the lung markings are normal and symmetrical. "
    assert negative[:4] == default[1][:1] + ["There is no pneumothorax. ", "no pneumothorax. ", "no evidence of pneumothorax. "]


def test_class_name_lists_follow_each_benchmark_label_order():
    assert len(eval_datasets.CLASS_NAMES["nih"]) == 14 and eval_datasets.CLASS_NAMES["nih"][12] == "pleural thickening"
    assert eval_datasets.CLASS_NAMES["chexpert"] == ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion"]
    assert eval_datasets.CLASS_NAMES["rsna"] == ["lung opacity"] and eval_datasets.CLASS_NAMES["siim"] == ["pneumothorax"]


def test_two_way_softmax_score_equals_sigmoid_of_the_dot_product_with_the_difference():
    z, positive, negative = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.allclose(ez.prompt_scores(z, positive, negative), torch.sigmoid(z @ (positive - negative).T))
    unit = torch.nn.functional.normalize
    cosine = torch.sigmoid(unit(z, dim=-1) @ (unit(positive, dim=-1) - unit(negative, dim=-1)).T)
    assert torch.allclose(ez.prompt_scores(z, positive, negative, cosine=True), cosine)
    assert torch.allclose(ez.prompt_scores(3 * z, positive, negative, cosine=True), cosine)


def test_class_embeddings_are_unnormalised_means_of_each_prompt_embedded_alone(tiny_model):
    model, tokenizer = tiny_model
    prompts = ez.class_prompts(["cardiomegaly", "pleural effusion"])
    positive, negative = ez.class_embeddings(model, tokenizer, prompts)
    for c, (pos, neg) in enumerate(prompts.values()):
        alone = [torch.cat([ez.embed_texts(model, tokenizer, [text]) for text in texts]) for texts in (pos, neg)]
        assert torch.allclose(positive[c], alone[0].mean(0), atol=1e-5)
        assert torch.allclose(negative[c], alone[1].mean(0), atol=1e-5)


def test_zero_shot_scores_are_sigmoid_of_image_embedding_times_prompt_difference(tiny_model):
    model, tokenizer = tiny_model
    images = torch.randn(3, model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)
    prompts = ez.class_prompts(["edema", "pneumothorax", "nodule"])
    scores = ez.zero_shot_scores(model, images, prompts, tokenizer)
    positive, negative = ez.class_embeddings(model, tokenizer, prompts)
    with torch.no_grad():
        _, z = model.encode_image(images)
    assert scores.shape == (3, 3)
    assert torch.allclose(scores, torch.sigmoid(z @ (positive - negative).T), atol=1e-6)


# ----------------------------------------------------------------------------- similarity maps

class PatchStub(torch.nn.Module):
    """The two things similarity_map uses: encode_image's patch embeddings and the correlation head's prior."""

    def __init__(self, patch_emb, weight):
        super().__init__()
        self.patch_emb = patch_emb
        self.correlation_head = torch.nn.Linear(weight.numel(), 1)
        self.correlation_head.weight.data = weight.view(1, -1)

    spatial_prior = MaCo.spatial_prior

    def encode_image(self, images):
        return self.patch_emb.expand(len(images), -1, -1), self.patch_emb.mean(1).expand(len(images), -1)


def test_similarity_map_has_the_image_shape_and_spans_minus_one_to_one(tiny_model):
    model, tokenizer = tiny_model
    size = model.cfg.img_size
    images = torch.randn(2, model.cfg.in_chans, size, size)
    maps = ez.similarity_map(model, images, ["small left pleural effusion.", "cardiomegaly."], tokenizer)
    assert maps.shape == (2, size, size)
    assert torch.allclose(maps.amin((1, 2)), torch.tensor(-1.0)) and torch.allclose(maps.amax((1, 2)), torch.tensor(1.0))
    single = ez.similarity_map(model, images[1], "cardiomegaly.", tokenizer)
    assert single.shape == (size, size) and torch.allclose(single, maps[1], atol=1e-5)


def test_similarity_map_peaks_at_the_patch_most_similar_to_the_phrase():
    patch_emb = torch.zeros(1, 64, 2)  # an 8x8 grid; patch (row 3, column 5) points along the phrase
    patch_emb[0, :, 1] = 1.0
    patch_emb[0, 3 * 8 + 5] = torch.tensor([5.0, 0.0])
    maps = ez.similarity_map(PatchStub(patch_emb, torch.zeros(64)), torch.zeros(1, 64, 64), torch.tensor([1.0, 0.0]))
    row, column = divmod(int(maps.argmax()), 64)
    assert 24 <= row < 32 and 40 <= column < 48  # inside that patch's 8x8 pixels


def test_similarity_map_weights_patches_by_softmax_of_the_correlation_head_over_0_02():
    patch_emb = torch.ones(1, 64, 2)  # every patch equally similar: only the spatial prior varies
    weight = torch.zeros(64)
    weight[4 * 8 + 3] = 0.02 * math.log(50.0)  # alpha 50x larger at (row 4, column 3)
    maps = ez.similarity_map(PatchStub(patch_emb, weight), torch.zeros(1, 64, 64), torch.tensor([1.0, 0.0]))
    row, column = divmod(int(maps.argmax()), 64)
    assert 32 <= row < 40 and 24 <= column < 32
    flat = ez.similarity_map(PatchStub(patch_emb, torch.zeros(64)), torch.zeros(1, 64, 64), torch.tensor([1.0, 0.0]))
    assert torch.all(flat == 0)  # a constant map has no contrast: 0 everywhere, not NaN or rounding noise


def test_grounding_caption_keeps_long_sentences_lower_cased():
    assert ez.grounding_caption("Small left effusion. Ok. Right base_x opacity") == "small left effusion. "
    assert ez.grounding_caption("Mild cardiomegaly") == "mild cardiomegaly. "
    assert ez.grounding_caption("Ok") == "ok. "


# ----------------------------------------------------------------------------- evaluation-set loaders

def labels_of(items):
    return [item.labels.tolist() for item in items]


def test_nih_loader_reads_the_official_v2020_csv_and_a_crlf_name_list(tmp_path):
    fixture = make_nih(tmp_path)
    items = eval_datasets.load_nih(tmp_path)
    assert [item.path.split("/")[-1] for item in items] == fixture["names"]
    nih = eval_datasets.NIH_LABELS
    assert items[0].labels[[nih.index("Cardiomegaly"), nih.index("Emphysema")]].tolist() == [1, 1]
    assert items[0].labels.sum() == 2 and items[1].labels.sum() == 0  # No Finding -> all zeros
    assert {nih[i] for i in np.flatnonzero(items[2].labels)} == {"Effusion", "Pneumothorax", "Pleural_Thickening"}


def test_nih_loader_takes_labels_from_macos_split_lines_when_present(tmp_path):
    make_nih(tmp_path, maco_lists=True)
    items = eval_datasets.load_nih(tmp_path)
    assert items[2].labels[eval_datasets.NIH_LABELS.index("Pleural_Thickening")] == 0  # the list wins over the CSV
    assert items[0].labels[eval_datasets.NIH_LABELS.index("Emphysema")] == 1


def test_rsna_loader_uses_split_list_labels_or_collapses_repeated_csv_rows(tmp_path):
    fixture = make_rsna(tmp_path)
    items = eval_datasets.load_rsna(tmp_path, "test_list.txt")
    assert labels_of(items) == [[label] for label in fixture["labels"]]
    assert items[0].path.endswith(".png")
    from_csv = eval_datasets.load_rsna(tmp_path, None)  # no list: every patient of the labels CSV, once
    assert labels_of(from_csv) == [[0.0], [1.0]]


def test_rsna_dicom_images_give_a_clear_error_naming_the_missing_reader(tmp_path):
    make_rsna(tmp_path, dicom_only=True)
    with pytest.raises(ValueError, match=r"\.dcm is a DICOM file.*no DICOM reader.*PNG or JPEG"):
        eval_datasets.load_rsna(tmp_path, "test_list.txt")


@pytest.mark.parametrize("leading_space", [True, False])
def test_siim_loader_labels_any_mask_and_finds_nested_images(tmp_path, leading_space):
    make_siim(tmp_path, leading_space)
    items = {item.path.split("/")[-1][:-4]: item for item in eval_datasets.load_siim(tmp_path)}
    assert items[SIIM_NEGATIVE].labels.tolist() == [0.0] and items[SIIM_POSITIVE].labels.tolist() == [1.0]
    assert items[SIIM_TWO_REGIONS].rle == ("10 5", "1000 3 20 2")
    mask = eval_datasets.siim_mask(items[SIIM_TWO_REGIONS])
    assert mask.sum() == 5 + 3 + 2 and mask[10:15, 0].all()  # column-major: pixels 10..14 are column 0
    assert [i.path.split("/")[-1][:-4] for i in eval_datasets.load_siim(tmp_path, "test_list.txt")] == [SIIM_POSITIVE, SIIM_TWO_REGIONS]


@pytest.mark.parametrize("policy, expected", [("maco", [1, 0, 0, 1, 1]), ("ones", [1, 1, 1, 1, 1]),
                                              ("zeros", [0, 0, 0, 0, 0])])
def test_chexpert_loader_applies_the_uncertainty_policy(tmp_path, policy, expected):
    make_chexpert(tmp_path)
    items = eval_datasets.load_chexpert(tmp_path, "train", policy, frontal_only=False)
    assert len(items) == 3 and items[1].labels.tolist() == expected  # -1.0 in all five columns
    assert items[0].labels.tolist() == [0, 0, 0, 0, 0]  # blanks and 0.0
    assert len(eval_datasets.load_chexpert(tmp_path, "train", policy, frontal_only=True)) == 2


def test_chexpert_loader_accepts_the_dataset_folder_or_its_parent(tmp_path):
    fixture = make_chexpert(tmp_path)
    for root in (tmp_path, fixture["folder"]):
        (item,) = eval_datasets.load_chexpert(root, "valid")
        assert item.labels.tolist() == [0, 1, 0, 0, 0] and item.path.endswith("view1_frontal.jpg")


def test_ms_cxr_loader_groups_boxes_per_image_and_lower_cased_phrase(tmp_path):
    make_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")
    pairs = eval_datasets.load_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")
    assert [(p.category, len(p.boxes)) for p in pairs] == [("Pneumonia", 1), ("Pleural Effusion", 2), ("Cardiomegaly", 1)]
    dataset = eval_datasets.GroundingDataset(pairs, size=30, in_chans=1)
    sample = dataset[1]
    assert sample["image"].shape == (1, 30, 30) and sample["mask"].shape == (30, 30)
    # 25 x 30 image -> left pad 2; boxes x 1..5 and 4..8 become columns 3..7 and 6..10: union 8 x 4
    assert sample["mask"].sum() == 32 and sample["mask"][22:26, 3:11].all()
    assert sample["phrase"] == "small bilateral pleural effusions"


def test_synthetic_loader_reads_the_test_split_labels_and_grounding_boxes(synthetic_root):
    from world.synthetic import FINDINGS
    items = eval_datasets.load_synthetic(synthetic_root, FINDINGS)
    rows = [line.split(",") for line in (synthetic_root / "synthetic-labels.csv").read_text().splitlines()[1:]]
    expected = {row[4]: [float(v) for v in row[5:]] for row in rows if row[3] == "test"}
    assert len(items) == len(expected) > 0
    assert all(item.labels.tolist() == expected[item.path[len(str(synthetic_root)) + 1:]] for item in items)
    pairs = eval_datasets.load_ms_cxr(synthetic_root / eval_datasets.MS_CXR_CSV, synthetic_root)
    assert pairs and {p.category.lower() for p in pairs} <= set(FINDINGS)
    test_paths = {item.path for item in items}
    assert all(pair.path in test_paths for pair in pairs)


@pytest.mark.parametrize("make, relative, load", [
    (make_nih, "Data_Entry_2017_v2020.csv", lambda root: eval_datasets.load_nih(root)),
    (make_rsna, "stage_2_train_labels.csv", lambda root: eval_datasets.load_rsna(root, None)),
    (make_siim, "train-rle.csv", lambda root: eval_datasets.load_siim(root)),
    (make_chexpert, "CheXpert-v1.0-small/valid.csv", lambda root: eval_datasets.load_chexpert(root)),
    (make_synthetic_labels, "synthetic-labels.csv", lambda root: eval_datasets.load_synthetic(root, ["edema"])),
])
def test_a_wrong_header_names_the_file_and_the_expected_header(tmp_path, make, relative, load):
    make(tmp_path)
    rewrite_header(tmp_path / relative, "id;label;something")
    with pytest.raises(ValueError, match=r"(?s)" + relative.split("/")[-1].replace(".", r"\.") + ".*Expected header"):
        load(tmp_path)


def test_ms_cxr_wrong_header_and_missing_root_are_clear(tmp_path):
    make_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        eval_datasets.load_ms_cxr(tmp_path / "ms-cxr", tmp_path / "nowhere")
    rewrite_header(tmp_path / "ms-cxr" / eval_datasets.MS_CXR_CSV, "dicom_id,category,text,path,x,y,w,h")
    with pytest.raises(ValueError, match=r"MS_CXR_Local_Alignment_v1\.0\.0\.csv.*dicom_id,category_name,label_text"):
        eval_datasets.load_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")


def test_a_wrong_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        eval_datasets.load_nih(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"train-rle\.csv not found"):
        eval_datasets.load_siim(tmp_path)


def test_missing_images_are_counted_and_skipped(tmp_path, capsys):
    make_nih(tmp_path)
    (tmp_path / "images" / "00007816_000.png").unlink()
    assert len(eval_datasets.load_nih(tmp_path)) == 2
    assert "skipped 1 of 3" in capsys.readouterr().out


def test_a_corrupt_image_names_the_file(tmp_path):
    make_rsna(tmp_path)
    items = eval_datasets.load_rsna(tmp_path, "test_list.txt")
    with open(items[0].path, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*\.png"):
        eval_datasets.ClassificationDataset(items, 16, 1)[0]


# ----------------------------------------------------------------------------- command line, end to end

def save_checkpoint(model, tokenizer, path):
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
                "tokenizer": tokenizer.to_str()}, path)
    return path


def test_cli_evaluates_nih_and_writes_metrics_json_and_roc_png(tmp_path, tiny_model, capsys):
    make_nih(tmp_path / "nih")
    ckpt = save_checkpoint(*tiny_model, tmp_path / "model.pt")
    out = tmp_path / "out"
    assert ez.main(["--ckpt", str(ckpt), "--data", "nih", "--root", str(tmp_path / "nih"), "--out", str(out),
                    "--n-boot", "20"]) == 0
    results = json.loads((out / "metrics.json").read_text())
    per_class = results["zero_shot"]["per_class"]
    assert list(per_class) == eval_datasets.CLASS_NAMES["nih"] and per_class["cardiomegaly"]["n_pos"] == 1
    assert per_class["hernia"]["auc"] is None  # no positives: undefined, written as null
    assert (out / "roc_curves.png").stat().st_size > 0
    assert "macro" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cli_grounds_ms_cxr_phrases_and_writes_overlays(tmp_path, tiny_model):
    make_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")
    ckpt = save_checkpoint(*tiny_model, tmp_path / "model.pt")
    out = tmp_path / "out"
    assert ez.main(["--ckpt", str(ckpt), "--data", "ms-cxr", "--root", str(tmp_path / "ms-cxr"),
                    "--mimic-root", str(tmp_path / "mimic"), "--out", str(out), "--overlays", "2"]) == 0
    grounding = json.loads((out / "metrics.json").read_text())["grounding"]
    assert grounding["n_pairs"] == 3 and set(grounding["per_category"]) == {"Pneumonia", "Pleural Effusion", "Cardiomegaly"}
    assert -10 < grounding["overall"]["cnr"] < 10 and 0 <= grounding["overall"]["miou"] <= 1
    assert sorted(p.name for p in out.glob("grounding_*.png")) == ["grounding_000.png", "grounding_001.png"]


def test_cli_exits_2_with_a_message_for_a_missing_checkpoint_or_a_wrong_root(tmp_path, tiny_model, capsys):
    assert ez.main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    ckpt = save_checkpoint(*tiny_model, tmp_path / "model.pt")
    assert ez.main(["--ckpt", str(ckpt), "--data", "nih", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert ez.main(["--ckpt", str(ckpt), "--data", "mnist", "--out", str(tmp_path)]) == 2
    assert "--data: invalid choice: 'mnist'" in capsys.readouterr().err


def test_json_output_is_atomic_and_strict(tmp_path):
    checkpoint.write_json({"a": float("nan"), "b": np.float32(0.5), "c": [np.int64(3)]}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": 0.5, "c": [3]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_cli_default_run_evaluates_the_synthetic_test_split_on_both_tasks(synthetic_root, tmp_path, tiny_model):
    from world.synthetic import FINDINGS
    ckpt = save_checkpoint(*tiny_model, tmp_path / "model.pt")
    out = tmp_path / "out"
    assert ez.main(["--ckpt", str(ckpt), "--root", str(synthetic_root), "--out", str(out), "--n-boot", "20",
                    "--overlays", "3"]) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results["zero_shot"]["per_class"]) == FINDINGS
    assert results["zero_shot"]["n_images"] == len(eval_datasets.load_synthetic(synthetic_root, FINDINGS))
    assert results["grounding"]["n_pairs"] == len(results["grounding"]["pairs"]) > 0
    assert len(list(out.glob("grounding_*.png"))) == min(3, results["grounding"]["n_pairs"])


def test_pairs_whose_box_vanishes_in_the_model_frame_are_counted_not_scored(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    make_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")
    pairs = eval_datasets.load_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")
    speck = eval_datasets.GroundingPair(pairs[0].path, "tiny nodule", "Nodule", [(3, 3, 0.2, 0.2)], 25, 30)
    dataset = eval_datasets.GroundingDataset(pairs + [speck], model.cfg.img_size, model.cfg.in_chans)
    result = ez.evaluate_grounding(model, tokenizer, dataset)
    assert result["skipped_empty_boxes"] == 1 and result["n_pairs"] == 3
    assert all(math.isfinite(pair["cnr"]) for pair in result["pairs"])


class BrightnessOracle(torch.nn.Module):
    """A stand-in model whose patch-phrase similarity is the patch's mean brightness (uniform spatial prior)."""

    def __init__(self, patch_size: int, num_patches: int):
        super().__init__()
        self.patch_size, self.cfg = patch_size, MaCoConfig(max_len=100)
        self.correlation_head = torch.nn.Linear(num_patches, 1)
        torch.nn.init.zeros_(self.correlation_head.weight)

    spatial_prior = MaCo.spatial_prior

    def encode_image(self, images):
        brightness = torch.nn.functional.avg_pool2d(images[:, :1], self.patch_size).flatten(1)  # (B, N), row-major
        patch_emb = torch.stack([brightness, torch.zeros_like(brightness)], dim=-1)  # (B, N, 2)
        return patch_emb, patch_emb.mean(1)

    def encode_text(self, input_ids, attention_mask):
        return torch.tensor([[1.0, 0.0]]).expand(len(input_ids), -1)


def test_an_oracle_map_points_into_the_box_through_the_letterboxed_frames(tmp_path, tiny_model):
    from PIL import Image
    _, tokenizer = tiny_model
    pixels = np.full((30, 40), 40, np.uint8)  # landscape 40 x 30, a bright square at x 14..25, y 8..19
    pixels[8:20, 14:26] = 230
    path = tmp_path / "files/p19/p19999991/s59999991/image.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(path)
    pair = eval_datasets.GroundingPair(str(path), "a bright square", "Mass", [(14, 8, 12, 12)], 40, 30)
    dataset = eval_datasets.GroundingDataset([pair], size=32, in_chans=1)  # r = 0.8, top pad 4: box -> (11, 10, 9, 9)
    result = ez.evaluate_grounding(BrightnessOracle(4, 64), tokenizer, dataset, out_dir=tmp_path, n_overlays=1)
    (scored,) = result["pairs"]
    assert scored["pointing_game"] == 1.0 and scored["cnr"] > 1.0 and scored["miou"] > 0.2
    assert (tmp_path / "grounding_000.png").is_file()


# ----------------------------------------------------------------------------- phrase specificity and readouts

def test_swapped_phrase_comes_from_another_finding_on_the_same_image_else_the_next_pair_of_another_category():
    pair = lambda path, category, phrase: eval_datasets.GroundingPair(path, phrase, category, [(0, 0, 1, 1)], 8, 8)  # noqa: E731
    pairs = [pair("a", "Nodule", "a nodule"), pair("a", "Edema", "mild edema"), pair("b", "Mass", "a mass"),
             pair("c", "Mass", "another mass"), pair("d", "Edema", "severe edema")]
    phrases, same_image = ez.swapped_phrases(pairs)
    # a: each other's phrase; b and c (one finding each): the next pair in order whose category differs,
    # d (last): wraps around to the first pair of another category
    assert phrases == ["mild edema", "a nodule", "severe edema", "severe edema", "a nodule"]
    assert same_image == [True, True, False, False, False]


def test_grounding_scores_each_pair_with_its_own_a_swapped_and_an_empty_phrase_for_both_readouts(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    make_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")
    pairs = eval_datasets.load_ms_cxr(tmp_path / "ms-cxr", tmp_path / "mimic")
    dataset = eval_datasets.GroundingDataset(pairs, model.cfg.img_size, model.cfg.in_chans)
    result = ez.evaluate_grounding(model, tokenizer, dataset)
    assert result["readout"] == "prior" and result["other_readout"]["readout"] == "cosine"
    for rows in (result["swapped"], result["prior_only"], *(result["other_readout"][c] for c in ("true", "swapped", "prior_only"))):
        assert rows["n_pairs"] == result["n_pairs"] == 3
    assert result["swapped"]["same_image_fraction"] == pytest.approx(2 / 3)  # the Pneumonia / Effusion image
    table = ez.format_results({"grounding": result})
    assert "another finding's phrase" in table and "empty phrase (prior only)" in table and "(the rows above)" in table
    cosine = ez.evaluate_grounding(model, tokenizer, dataset, readout="cosine")
    assert cosine["overall"] == result["other_readout"]["true"]["overall"]


def test_cosine_readout_ignores_the_prior_and_the_patch_norms():
    patch_emb = torch.zeros(1, 64, 2)
    patch_emb[0, :, 1] = 1.0
    patch_emb[0, 3 * 8 + 5] = torch.tensor([0.1, 0.0])  # short, but points along the phrase
    patch_emb[0, 0] = torch.tensor([10.0, 100.0])  # 1000 times longer, slightly along the phrase (cosine 0.1)
    weight = torch.zeros(64)
    weight[0] = 1.0  # a prior that would put everything on patch 0
    stub = PatchStub(patch_emb, weight)
    maps = ez.similarity_map(stub, torch.zeros(1, 64, 64), torch.tensor([1.0, 0.0]), readout="cosine")
    row, column = divmod(int(maps.argmax()), 64)
    assert 24 <= row < 32 and 40 <= column < 48
    prior_maps = ez.similarity_map(stub, torch.zeros(1, 64, 64), torch.tensor([1.0, 0.0]), readout="prior")
    assert divmod(int(prior_maps.argmax()), 64)[0] < 8
