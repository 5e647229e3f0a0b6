"""segment.py: masks from train-rle.csv (round trip, union of regions, letterbox), the released split lists'
overlap, the pyramid and head shapes, the released focal and Dice losses and the Dice metrics against hand-computed
values, the Dice over the batch and balanced sampling, the schedule, the synthetic world's masks, clear errors for
bad input; a short run lowers the loss; the SIIM recipes pinned to the released configs, the heads' mmseg
initialisation, the Dice at each image's own size as the released test.sh computes it; slow: the whole script end
to end, the diagnosis tool."""
import dataclasses
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import segment as sg
from backbone import encoders_to_compare, layer_decay_groups, new_encoder
from finetune import EndlessPermutations
from fixtures_eval import write_text
from maco import MaCoConfig
from test_finetune import write_train_checkpoint
from util import eval_datasets
from util import metrics as mt

IDS = [f"1.2.276.0.7230010.3.1.4.8323329.{k}.1517875{k:03d}.1" for k in range(8)]


def make_siim_world(root, size=32):
    """A SIIM-ACR folder as downloaded (leading-space values, -1, two rows for one image), images nested
    Study/Series/SOP, and released-style split lists that overlap: test ids 5 and 6 are also in train_1 / val_list,
    validation id 4 is also in train_1. Returns {ImageId: true mask (size, size)}."""
    masks = {i: np.zeros((size, size), bool) for i in IDS}
    masks[IDS[0]][4:10, 3:7] = True
    masks[IDS[1]][20:24, 20:30] = True
    masks[IDS[1]][2:5, 2:5] = True  # a second region: a second row
    masks[IDS[5]][10:20, 10:12] = True
    rows = []
    for image_id in IDS:
        regions = [masks[image_id]] if image_id != IDS[1] else [masks[image_id] & (np.arange(size)[:, None] >= 20),
                                                               masks[image_id] & (np.arange(size)[:, None] < 20)]
        rows += [f"{image_id}, {eval_datasets.rle_encode(region)}" for region in regions]
        pixels = (np.add.outer(np.arange(size), np.arange(size)) * 4 % 256).astype(np.uint8)
        path = root / "png-images-train" / f"1.2.{image_id[-6:]}" / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    write_text(root / "train-rle.csv", "ImageId, EncodedPixels\n" + "\n".join(rows) + "\n")
    splits = root / "DatasetsSplits" / "SIIM-ACR_Pneumothorax"
    write_text(splits / "train_1.txt", "\n".join([IDS[0], IDS[1], IDS[2], IDS[4], IDS[5]]) + "\n")
    write_text(splits / "val_list.txt", "\n".join([IDS[3], IDS[4], IDS[6]]) + "\n")
    write_text(splits / "test_list.txt", "\n".join([IDS[5], IDS[6], IDS[7]]) + "\n")
    return masks


def error_of(argv, capsys) -> str:
    assert sg.main(argv) == 2
    return capsys.readouterr().err


# -- masks ------------------------------------------------------------------------------------------------------

def test_rle_round_trip_and_the_union_of_an_images_regions(tmp_path):
    masks = make_siim_world(tmp_path)
    items = sg.images_with_masks(tmp_path)
    two_regions = items[IDS[1]]
    assert len(two_regions.rle) == 2 and not items[IDS[2]].rle  # " -1": no region
    for rle in two_regions.rle:  # each row decodes to a mask that encodes back to the same text
        assert eval_datasets.rle_encode(eval_datasets.rle_decode(rle, 32, 32)) == rle
    assert np.array_equal(eval_datasets.siim_mask(two_regions, 32, 32), masks[IDS[1]])  # the union of the rows
    cache = {}
    sg.decode_masks(list(items.values()), 32, cache)  # at the image's own size the letterbox is the identity
    for image_id, item in items.items():
        packed = cache[(item.path, 32)]
        decoded = np.zeros(32 * 32, bool) if packed is None else np.unpackbits(packed, count=32 * 32).astype(bool)
        assert np.array_equal(decoded.reshape(32, 32), masks[image_id])


def test_letterbox_mask_scales_the_long_side_and_pads_the_short_one():
    mask = np.zeros((20, 40), bool)  # H 20, W 40
    mask[0:10, 0:20] = True  # the top-left quarter
    boxed = sg.letterbox_mask(mask, 20)  # scale 1/2: content 10 rows x 20 columns, rows 5..14
    expected = np.zeros((20, 20), bool)
    expected[5:10, 0:10] = True
    assert np.array_equal(boxed, expected)


def test_a_run_length_encoding_longer_than_its_image_is_a_clear_error(tmp_path):
    make_siim_world(tmp_path)
    write_text(tmp_path / "train-rle.csv", f"ImageId, EncodedPixels\n{IDS[0]}, 1000 30\n")
    items = list(sg.images_with_masks(tmp_path).values())
    with pytest.raises(ValueError, match=rf"{IDS[0]} in train-rle.csv: .*ends at pixel 1030, beyond the 32x32"):
        sg.decode_masks(items, 32, {})


def test_the_synthetic_world_writes_every_images_pneumothorax_mask(synthetic_root):
    labels = {row["dicom_id"]: row for row in eval_datasets.read_csv(synthetic_root / "synthetic-labels.csv")}
    rows = list(eval_datasets.read_csv(synthetic_root / "train-rle.csv", ["ImageId", "EncodedPixels"]))
    assert (synthetic_root / "train-rle.csv").read_text().startswith("ImageId, EncodedPixels\n")
    assert {row["ImageId"] for row in rows} == set(labels)  # every image of every split
    positive = {row["ImageId"] for row in rows if row["EncodedPixels"].strip() != "-1"}
    with_pneumothorax = {i for i, row in labels.items() if row["pneumothorax"] == "1"}
    assert positive <= with_pneumothorax and len(positive) >= 0.8 * len(with_pneumothorax)
    assert all(row["EncodedPixels"].startswith(" ") for row in rows)  # the Kaggle leading space
    assert {labels[i]["split"] for i in positive} == {"train", "validate", "test"}
    for row in rows:  # a mask of the written image size, on one side of the image
        if row["EncodedPixels"].strip() != "-1":
            mask = eval_datasets.rle_decode(row["EncodedPixels"], 128, 128)
            columns = np.flatnonzero(mask.any(axis=0))
            assert mask.any() and (columns.max() < 64 or columns.min() >= 64)


def test_an_old_synthetic_world_without_masks_says_how_to_regenerate(tmp_path, capsys):
    write_text(tmp_path / "synthetic-labels.csv", "dicom_id,subject_id,study_id,split,path,pneumothorax\n")
    err = error_of(["--recipe", "synthetic-1", "--root", str(tmp_path), "--scratch", "--out-dir", str(tmp_path / "o")],
                   capsys)
    assert "without pneumothorax masks" in err and f"python -m world.synthetic --out {tmp_path} --overwrite" in err


# -- the released split lists -----------------------------------------------------------------------------------

def test_test_ids_are_removed_from_the_training_and_validation_lists_unless_kept():
    lists = {"train_list.txt": ["a", "b", "c", "d"], "val_list.txt": ["c", "e", "f"], "test_list.txt": ["d", "f", "g"]}
    cleaned, notes = sg.remove_test_overlap(lists, keep=False)
    assert cleaned == {"train_list.txt": ["a", "b", "c"], "val_list.txt": ["c", "e"], "test_list.txt": ["d", "f", "g"]}
    assert notes[0].startswith("removed 1 test ids from train_list.txt and 1 from val_list.txt")
    assert notes[1].startswith("note: 1 val_list.txt ids are also in train_list.txt")
    kept, notes = sg.remove_test_overlap(lists, keep=True)
    assert kept == lists and notes[0].startswith("warning: kept 1 test ids in train_list.txt and 1 in val_list.txt")
    assert sg.remove_test_overlap({"t": ["a"], "v": ["b"], "x": ["c"]}, keep=False) == (
        {"t": ["a"], "v": ["b"], "x": ["c"]}, [])


def test_siim_as_downloaded_loads_the_released_lists_without_the_overlap(tmp_path, capsys):
    make_siim_world(tmp_path)
    run = sg.resolve(sg.SegmentConfig(recipe="siim-1", root=str(tmp_path), split_dir=str(tmp_path / "DatasetsSplits"),
                                      scratch=True))[0]
    data = sg.load_data(run)
    ids = {split: [item.path.split("/")[-1][:-4] for item in data[split]] for split in ("train", "val", "test")}
    assert ids == {"train": [IDS[0], IDS[1], IDS[2], IDS[4]], "val": [IDS[3], IDS[4]], "test": [IDS[5], IDS[6], IDS[7]]}
    out = capsys.readouterr().out
    assert "removed 1 test ids from train_1.txt and 1 from val_list.txt" in out
    assert "1 val_list.txt ids are also in train_1.txt" in out
    kept = sg.load_data(sg.dataclasses.replace(run, keep_overlap=True))
    assert len(kept["train"]) == 5 and len(kept["val"]) == 3


# -- model, losses, metrics, schedule -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset, size, channels", [("tiny", 64, 32), ("base", 64, 16)])
def test_pyramid_and_head_shapes(preset, size, channels):
    torch.manual_seed(0)
    cfg = MaCoConfig.preset(preset)
    run = sg.SegmentConfig(img_size=size, head_channels=channels, aux_channels=8, head_init="pytorch",
                           train_pos_embed=False)
    model = sg.build_segmenter(dict(encoder=new_encoder(cfg), cfg=cfg), run, torch.device("cpu"))
    assert model.backbone.block_indices == {"tiny": (0, 1, 2, 3), "base": (3, 5, 7, 11)}[preset]
    images = torch.randn(2, cfg.in_chans, size, size)
    grid = size // cfg.patch_size
    pyramid = model.pyramid(model.backbone(images))
    assert [p.shape for p in pyramid] == [(2, cfg.width, 4 * grid, 4 * grid), (2, cfg.width, 2 * grid, 2 * grid),
                                          (2, cfg.width, grid, grid), (2, cfg.width, grid // 2, grid // 2)]
    assert model.decode_head(pyramid).shape == (2, 2, 4 * grid, 4 * grid)
    logits, aux_logits = model.train()(images)
    assert logits.shape == aux_logits.shape == (2, 2, size, size)
    assert model.eval()(images)[1] is None  # the auxiliary head only trains
    groups = layer_decay_groups(model.backbone.encoder, model, 0.05, 0.65)
    scale = {name: group["lr_scale"] for group in groups for name in group["names"]}
    assert scale["others.pyramid.up2.weight"] == scale["others.decode_head.classifier.weight"] == 1.0
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


def test_focal_loss_against_hand_computed_values():
    third = math.log(3)  # sigmoid(ln 3) = 3/4
    logits = torch.tensor([[[[0.0, third]], [[0.0, -third]]]])  # (1, 2 classes, 1, 2 pixels)
    target = torch.tensor([[[1, 0]]])
    # pixel 1 (p = 1/2 in both channels): BCE ln 2, weight 0.5 (1/2)^2, twice; pixel 2 (right in both channels,
    # p_t = 3/4): BCE ln(4/3), weight 0.5 (1/4)^2, twice; the mean over the 4 elements
    expected = (2 * 0.125 * math.log(2) + 2 * 0.03125 * math.log(4 / 3)) / 4
    assert sg.sigmoid_focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_against_hand_computed_values_including_an_empty_truth():
    third = math.log(3)
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, third]]],  # foreground probabilities 1/2 and 3/4
                           [[[0.0, 0.0]], [[0.0, 0.0]]]])  # 1/2 and 1/2
    target = torch.tensor([[[1, 0]], [[0, 0]]])  # the second image has no pneumothorax
    first = 1 - (2 * 0.5 + 1) / (0.25 + 0.5625 + 1 + 1)  # 1 - 2 / 2.8125
    second = 1 - 1 / (0.5 + 0 + 1)  # empty truth: only sum(p^2) is left to shrink
    assert sg.dice_loss(logits, target).item() == pytest.approx((first + second) / 2 / 2, rel=1e-6)
    total = sg.segmentation_loss(logits, target).item()
    assert total == pytest.approx(2 * sg.sigmoid_focal_loss(logits, target).item() + (first + second) / 4, rel=1e-6)


def test_batch_dice_loss_pools_the_pixels_of_the_batch_against_hand_computed_values():
    third = math.log(3)
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, third]]],  # foreground probabilities 1/2 and 3/4
                           [[[0.0, 0.0]], [[0.0, 0.0]]]])  # 1/2 and 1/2
    target = torch.tensor([[[1, 0]], [[0, 0]]])  # the second image has no pneumothorax
    # one Dice over the 4 pixels: (2 * 1/2 + 1) / (1/4 + 9/16 + 1/4 + 1/4 + 1 + 1), divided by the 2 classes
    expected = (1 - 2 / 3.3125) / 2
    assert sg.dice_loss(logits, target, per_image=False).item() == pytest.approx(expected, rel=1e-6)
    total = sg.segmentation_loss(logits, target, dice="batch").item()
    assert total == pytest.approx(2 * sg.sigmoid_focal_loss(logits, target).item() + expected, rel=1e-6)
    # the negative image's pixels only enlarge the denominator: without them the batch Dice is the first image's
    assert sg.dice_loss(logits[:1], target[:1], per_image=False).item() == pytest.approx(
        sg.dice_loss(logits[:1], target[:1]).item(), rel=1e-6)


def test_balanced_draws_take_half_positives_and_every_positive_once_per_pass():
    positives, negatives = [3, 7, 11], list(set(range(40)) - {3, 7, 11})
    draws = list(itertools.islice(iter(sg.BalancedDraws(positives, negatives, seed=0)), 6000))
    share = np.mean([d in positives for d in draws])
    assert 0.47 < share < 0.53  # binomial(6000, 1/2): the standard deviation of the share is 0.0065
    drawn_positives = [d for d in draws if d in positives]
    for start in range(0, 30, 3):  # each pass over the positives is a permutation of them
        assert sorted(drawn_positives[start:start + 3]) == positives
    assert sorted(set(draws)) == list(range(40))
    again = list(itertools.islice(iter(sg.BalancedDraws(positives, negatives, seed=0)), 6000))
    assert again == draws  # the same for a seed


def test_balanced_sampling_of_a_subset_without_positives_falls_back_to_uniform(capsys):
    items = [SimpleNamespace(rle=[]) for _ in range(5)]
    setting = sg.SegmentConfig(recipe="synthetic-1", sampling="balanced", scratch=True)
    sampler = sg.training_sampler(items, setting)
    assert isinstance(sampler, EndlessPermutations)
    assert "all negative: drawn uniformly" in capsys.readouterr().out
    items[2] = SimpleNamespace(rle=["1 2"])
    assert isinstance(sg.training_sampler(items, setting), sg.BalancedDraws)
    assert isinstance(sg.training_sampler(items, dataclasses.replace(setting, sampling="uniform")), EndlessPermutations)


def test_dice_metrics_follow_the_released_per_image_rule():
    truth = np.zeros((4, 4, 4), bool)
    predicted = np.zeros((4, 4, 4), bool)
    truth[0, 0, :4] = True
    predicted[0, 0, :2] = True  # image 0: Dice 2 * 2 / (2 + 4) = 2/3
    predicted[2, 1, :3] = True  # image 1: both empty -> 1; image 2: empty truth, 3 predicted -> 0
    truth[3, 2, :2] = True  # image 3: 2 true pixels missed -> 0
    counts = mt.overlap_counts(predicted, truth)
    assert counts.tolist() == [[2, 2, 4], [0, 0, 0], [0, 3, 0], [0, 0, 2]]
    assert mt.per_image_dice(counts).tolist() == pytest.approx([2 / 3, 1, 0, 0])
    scores = mt.dice_scores(counts)
    assert scores["med_dice"] == pytest.approx((2 / 3 + 1) / 4)
    assert scores["pooled_dice"] == pytest.approx(2 * 2 / (5 + 6))
    assert scores["positive_dice"] == pytest.approx((2 / 3 + 0) / 2)
    report = mt.segmentation_metrics(counts, n_boot=200)
    assert report["n_images"] == 4 and report["n_positive"] == 2
    for name in ("med_dice", "pooled_dice", "positive_dice"):
        low, high = report[f"{name}_ci95"]
        assert 0 <= low <= report[name] <= high <= 1


def test_schedule_warms_up_linearly_then_decays_linearly_to_zero():
    assert sg.segment_lr(0, 1.0, 10, 100) == pytest.approx(1e-6)
    assert sg.segment_lr(5, 1.0, 10, 100) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert sg.segment_lr(10, 1.0, 10, 100) == pytest.approx(0.9)
    assert sg.segment_lr(99, 1.0, 10, 100) == pytest.approx(0.01)


def test_a_short_run_lowers_the_loss():
    torch.manual_seed(0)
    cfg = MaCoConfig.preset("tiny")
    run = sg.SegmentConfig(img_size=64, head_channels=16, aux_channels=8, lr=1e-3, steps=10, warmup_steps=2,
                           eval_interval=100, drop_path=0.0, precision="fp32", dice="image", select_by="pooled_dice",
                           head_init="pytorch", train_pos_embed=False)
    model = sg.build_segmenter(dict(encoder=new_encoder(cfg), cfg=cfg), run, torch.device("cpu"))
    images = torch.randn(2, 1, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.int64)
    masks[:, 10:30, 5:15] = 1
    history = sg.fit(model, iter(lambda: (images, masks), None), run, lambda: 0.0, torch.device("cpu"))
    assert len(history["losses"]) == 10 and history["validations"] == {0: 0.0, 10: 0.0}
    assert np.mean(history["losses"][-3:]) < 0.85 * np.mean(history["losses"][:3])


def test_the_last_steps_weights_are_tested_on_request():
    cfg = MaCoConfig.preset("tiny")
    images, masks = torch.randn(2, 1, 64, 64), torch.zeros(2, 64, 64, dtype=torch.int64)
    states = {}
    for test_weights in sg.TEST_WEIGHTS:  # validation falls after step 0: "best" goes back to the initial weights
        torch.manual_seed(0)
        run = sg.SegmentConfig(img_size=64, head_channels=16, aux_channels=8, lr=1e-3, steps=3, warmup_steps=1,
                               eval_interval=1, precision="fp32", dice="batch", select_by="pooled_dice",
                               head_init="pytorch", train_pos_embed=True, test_weights=test_weights)
        model = sg.build_segmenter(dict(encoder=new_encoder(cfg), cfg=cfg), run, torch.device("cpu"))
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        scores = iter([1.0, 0.5, 0.4, 0.3])
        history = sg.fit(model, iter(lambda: (images, masks), None), run, lambda: next(scores), torch.device("cpu"))
        assert history["best_step"] == 0
        states[test_weights] = all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
        assert not torch.equal(model.backbone.encoder.pos_embed, initial["backbone.encoder.pos_embed"]) or \
            test_weights == "best"  # a trainable position table moves
    assert states == {"best": True, "last": False}


def test_the_mmseg_head_initialisation():
    torch.manual_seed(0)
    head = sg.UPerHead(192, 64)
    sg.init_like_mmseg(head)
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(head.classifier.bias, torch.zeros(2))
    conv = head.fpn_bottleneck[0]  # a 3x3 conv from 4 x 64 to 64 channels: Kaiming fan-out std sqrt(2 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert torch.equal(head.fpn_bottleneck[1].weight, torch.ones(64))
    cfg = MaCoConfig.preset("tiny")
    torch.manual_seed(0)
    stds = {}
    for head_init in sg.HEAD_INITS:  # both heads, by the flag: 16 weights of std 0.01 against PyTorch's ~0.2
        run = sg.SegmentConfig(img_size=64, head_channels=16, aux_channels=8, head_init=head_init, train_pos_embed=False)
        model = sg.build_segmenter(dict(encoder=new_encoder(cfg), cfg=cfg), run, torch.device("cpu"))
        stds[head_init] = [head.classifier.weight.std().item() for head in (model.decode_head, model.aux_head)]
    assert max(stds["mmseg"]) < 0.03 < 0.1 < min(stds["pytorch"])


def test_counts_at_an_images_own_size_undo_the_letterbox(tmp_path):
    path = tmp_path / "a.png"  # 40 wide, 20 high: at 20 pixels the content is rows 5..14, 20 columns
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(path)
    truth = np.zeros((20, 40), bool)
    truth[0:10, 0:20] = True  # the top-left quarter
    item = eval_datasets.LabelledImage(str(path), None, rle=[eval_datasets.rle_encode(truth)])
    logits = torch.zeros(2, 20, 20)
    logits[1] = -1.0
    logits[1, 5:10, 0:20] = 1.0  # foreground over the content's top half: the image's top half at its own size
    counts, pixels = sg.counts_at_original_size(logits, item)
    assert pixels == 800 and counts.tolist() == [200, 400, 200]
    empty = eval_datasets.LabelledImage(str(path), None, rle=[])
    assert sg.counts_at_original_size(torch.zeros(2, 20, 20), empty)[0].tolist() == [0, 0, 0]


def test_the_released_per_class_dice_against_hand_computed_values():
    counts, pixels = np.array([[200, 400, 200], [0, 0, 0]]), np.array([800, 800])
    scores = mt.dice_scores(counts, pixels)
    # foreground 2*200 / (400 + 200); background: 1600 - 400 - 200 + 200 = 1200 shared, of 1200 and 1400 pixels
    assert scores["pooled_dice"] == pytest.approx(2 / 3) and scores["background_dice"] == pytest.approx(2400 / 2600)
    assert scores["m_dice"] == pytest.approx((2 / 3 + 2400 / 2600) / 2)
    metrics = mt.segmentation_metrics(counts, n_boot=20, pixels=pixels)
    assert metrics["m_dice_ci95"][0] <= metrics["m_dice"] <= metrics["m_dice_ci95"][1]


# The SIIM recipes as the released configs give them (docs/segmentation.md §3 cites each file): a change to a
# synthetic recipe must not move them
RELEASED_SIIM = {
    "siim-1": dict(lr=5e-6, steps=1_000, warmup_steps=100, eval_interval=50, label_fraction=0.01),
    "siim-10": dict(lr=2e-5, steps=5_000, warmup_steps=100, eval_interval=50, label_fraction=0.1),
    "siim-100": dict(lr=1.5e-5, steps=160_000, warmup_steps=1_500, eval_interval=500, label_fraction=1.0),
}
RELEASED_SIIM_ALL = dict(preset="base", img_size=512, batch_size=8, head_channels=768, aux_channels=256,
                         sampling="uniform", dice="image", select_by="med_dice", train_pos_embed=True, head_init="mmseg")
RELEASED_SIIM_FLAGS = dict(drop_path=0.1, weight_decay=0.05, layer_decay=0.65, aux_head=True,
                           decay_exempt="norms_biases_tokens", layer_ids="by_block", test_weights="best")


@pytest.mark.parametrize("name", sorted(RELEASED_SIIM))
def test_the_siim_recipes_are_pinned(name, tmp_path):
    run = sg.resolve(sg.SegmentConfig(recipe=name, root=str(tmp_path), split_dir=str(tmp_path), scratch=True))[0]
    expected = dict(RELEASED_SIIM[name], **RELEASED_SIIM_ALL, **RELEASED_SIIM_FLAGS)
    assert {key: getattr(run, key) for key in expected} == expected
    assert set(sg.RECIPES[name]) - {"data", "root", "ckpt", "scratch", "workers"} == set(RELEASED_SIIM[name]) | set(
        RELEASED_SIIM_ALL)  # every recipe value is pinned


def test_the_siim_recipe_runs_on_a_tiny_copy_and_scores_at_the_images_own_size(tmp_path, capsys):
    make_siim_world(tmp_path, size=48)  # 48-pixel images, a 32-pixel input: the metric undoes the resize
    out = tmp_path / "out"
    assert sg.main(["--recipe", "siim-1", "--root", str(tmp_path), "--split-dir", str(tmp_path / "DatasetsSplits"),
                    "--scratch", "--preset", "tiny", "--img-size", "32", "--steps", "2", "--eval-interval", "1",
                    "--batch-size", "2", "--head-channels", "8", "--aux-channels", "4", "--workers", "0",
                    "--n-boot", "10", "--overlays", "0", "--test-weights", "last", "--out-dir", str(out)]) == 0
    assert "as the released test.sh (--eval mDice) scores it" in capsys.readouterr().out
    (run,) = json.loads((out / "metrics.json").read_text())["runs"]
    assert run["tested_step"] == 2 and run["weights"].endswith("last.pt")
    original = run["test_original"]
    assert original["m_dice"] == pytest.approx((original["background_dice"] + original["pooled_dice"]) / 2)
    arrays = sg.read_arrays(out / "siim-1" / "scratch" / "test_outputs.npz")
    assert arrays["pixels_original"].tolist() == [48 * 48] * 3
    assert arrays["counts_original"][:, 2].tolist() == [20, 0, 0]  # test ids 5, 6, 7: image 5's 10 x 2 mask
    weights = torch.load(run["weights"], weights_only=False)["segmenter"]
    assert weights["backbone.encoder.pos_embed"].shape == (1, 1 + 4 * 4, 192)


# -- bad input ------------------------------------------------------------------------------------------------------

def test_a_mask_file_whose_ids_match_no_image_is_a_clear_error(tmp_path, capsys):
    make_siim_world(tmp_path)
    write_text(tmp_path / "train-rle.csv", "ImageId, EncodedPixels\n1.2.3.4, -1\n")
    err = error_of(["--recipe", "siim-1", "--root", str(tmp_path), "--split-dir", str(tmp_path / "DatasetsSplits"),
                    "--scratch", "--preset", "tiny", "--img-size", "32", "--out-dir", str(tmp_path / "o")], capsys)
    assert "none of the 1 listed images were found" in err


def test_an_empty_split_list_is_a_clear_error(tmp_path, capsys):
    make_siim_world(tmp_path)
    write_text(tmp_path / "DatasetsSplits" / "SIIM-ACR_Pneumothorax" / "val_list.txt", "\n")
    err = error_of(["--recipe", "siim-1", "--root", str(tmp_path), "--split-dir", str(tmp_path / "DatasetsSplits"),
                    "--scratch", "--preset", "tiny", "--img-size", "32", "--out-dir", str(tmp_path / "o")], capsys)
    assert "val_list.txt is empty" in err


def test_a_checkpoint_of_another_preset_is_a_clear_error(tmp_path, capsys):
    make_siim_world(tmp_path)
    write_train_checkpoint(tmp_path / "tiny.pt")
    err = error_of(["--recipe", "siim-1", "--root", str(tmp_path), "--split-dir", str(tmp_path / "DatasetsSplits"),
                    "--ckpt", str(tmp_path / "tiny.pt"), "--out-dir", str(tmp_path / "o")], capsys)
    assert "is a tiny model, but --recipe siim-1 uses the base preset" in err


def test_an_input_size_not_divisible_by_the_patch_size_is_a_clear_error(tmp_path, capsys):
    err = error_of(["--recipe", "synthetic-1", "--scratch", "--img-size", "60", "--out-dir", str(tmp_path)], capsys)
    assert "--img-size 60 is not a multiple of the encoder's patch size 8" in err


def test_the_checkpoint_and_a_random_encoder_of_its_shape_are_compared(tmp_path):
    write_train_checkpoint(tmp_path / "maco.pt")
    run = sg.resolve(sg.SegmentConfig(recipe="synthetic-1", ckpt=str(tmp_path / "maco.pt")))[0]
    inits = encoders_to_compare(run)
    assert [init["name"] for init in inits] == ["maco", "scratch"]
    assert inits[0]["cfg"] == inits[1]["cfg"]
    pretrained, scratch = (init["encoder"].state_dict() for init in inits)
    assert pretrained.keys() == scratch.keys()
    assert not torch.equal(pretrained["blocks.0.attn.qkv.weight"], scratch["blocks.0.attn.qkv.weight"])


def test_a_missing_checkpoint_says_to_run_train_py(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = error_of(["--recipe", "synthetic-1"], capsys)
    assert "no checkpoint at runs/maco/checkpoint.pt: run `python train.py` first" in err


# -- end to end ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_segment_end_to_end_on_the_synthetic_world(synthetic_root, tmp_path, capsys):
    write_train_checkpoint(tmp_path / "maco.pt")
    out = tmp_path / "out"
    argv = ["--recipe", "synthetic", "--root", str(synthetic_root), "--ckpt", str(tmp_path / "maco.pt"), "--no-scratch",
            "--img-size", "64", "--steps", "2", "--warmup-steps", "1", "--eval-interval", "2", "--batch-size", "4",
            "--head-channels", "8", "--aux-channels", "8", "--n-boot", "20", "--overlays", "2", "--out-dir", str(out),
            "--figure", str(tmp_path / "docs" / "segmentation.png")]
    assert sg.main(argv) == 0
    printed = capsys.readouterr().out
    assert "per-image Dice (medDice) (%)" in printed and "pooled Dice (%)" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert [(r["init"], r["label_fraction"]) for r in summary["runs"]] == [("maco", f) for f in (0.01, 0.1, 1.0)]
    run = summary["runs"][-1]
    assert {"med_dice", "med_dice_ci95", "pooled_dice", "positive_dice_ci95"} <= set(run["test"])
    assert run["train_images"] > summary["runs"][0]["train_images"] >= 1
    assert (out / "segmentation.png").is_file() and (tmp_path / "docs" / "segmentation.png").is_file()
    assert (out / "synthetic-100" / "maco" / "best.pt").is_file()
    assert (out / "synthetic-100" / "maco" / "overlays.png").is_file()
    assert sg.main(["--redraw", "--out-dir", str(out), "--figure", str(tmp_path / "again.png")]) == 0  # no training
    assert (tmp_path / "again.png").is_file() and "pooled Dice (%)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_diagnosis_measures_each_variant_at_every_interval(synthetic_root, tmp_path, capsys):
    from tools import segment_diagnosis
    out = tmp_path / "diagnosis"
    assert segment_diagnosis.main(["--variants", "released,synthetic", "--steps", "3", "--interval", "2",
                                   "--out-dir", str(out), "--root", str(synthetic_root)]) == 0
    variants = json.loads((out / "diagnosis.json").read_text())["variants"]
    assert variants["synthetic"]["flags"] == dict(sampling="balanced", dice="batch", select_by="pooled_dice")
    for result in variants.values():
        rows = result["rows"]
        assert [row["step"] for row in rows] == [0, 2, 3]
        for row in rows:
            assert 0 <= row["p_outside"] <= 1 and 0 <= row["p_inside"] <= 1 and 0 <= row["val_pooled_dice"] <= 1
    assert segment_diagnosis.main(["--variants", "nonsense"]) == 2
    assert "unknown nonsense" in capsys.readouterr().err
