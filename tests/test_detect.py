"""detect.py: the feature pyramid's levels, COCO box AP on hand-made cases with known answers (and against
pycocotools when it is installed), stage_2_train_labels.csv as downloaded, the patientId hash split, the schedule
and the scale jitter, clear errors or counted skips for bad input, the RSNA recipes pinned to the released config,
detectron2's aligned RoIAlign and L1 box loss; slow: a short run lowers the loss, and the whole script end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import detect as dt
from backbone import new_encoder
from fixtures_eval import write_text
from maco import MaCoConfig
from test_finetune import write_train_checkpoint
from util import eval_datasets
from util import metrics as mt

IDS = [f"{k:08x}-14fd-4e49-80ba-63a80b6bddd6" for k in range(12)]


def make_rsna(root, size=64) -> None:
    """RSNA as downloaded, small: stage_2_train_labels.csv with Target-0 rows and a patient with two boxes; PNG
    images of side `size` in stage_2_train_images/, one patient left as DICOM."""
    rows = ["patientId,x,y,width,height,Target"]
    for k, patient_id in enumerate(IDS):
        rows += [f"{patient_id},,,,,0"] if k % 3 else [f"{patient_id},8.0,10.0,20.0,16.0,1"]
    rows.append(f"{IDS[0]},50.0,30.0,20.0,20.0,1")  # a second box of the first patient, beyond a 64-pixel image
    write_text(root / "stage_2_train_labels.csv", "\n".join(rows) + "\n")
    for patient_id in IDS[:-1]:
        path = root / "stage_2_train_images" / f"{patient_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size), 100, np.uint8)).save(path)
    write_text(root / "stage_2_train_images" / f"{IDS[-1]}.dcm", "DICM")


def synthetic_run(**settings) -> dt.DetectConfig:
    """A DetectConfig with the synthetic recipe's model settings, then `settings`."""
    return dt.DetectConfig(**dict(dt.SETTINGS["synthetic"], **settings))


def error_of(argv, capsys) -> str:
    assert dt.main(argv) == 2
    return capsys.readouterr().err


# -- the model ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, size, channels", [("tiny", 64, 64), ("base", 128, 256)])
def test_pyramid_levels_are_4x_2x_1x_half_and_quarter_of_the_patch_grid(preset, size, channels):
    torch.manual_seed(0)
    cfg = MaCoConfig.preset(preset)
    run = synthetic_run(recipe="synthetic-1", img_size=size, pyramid_channels=channels, box_head_width=32,
                        proposals=50, rois_per_image=16)
    detector = dt.build_detector(new_encoder(cfg), run, cfg.in_chans).eval()
    with torch.no_grad():
        maps = detector.backbone(torch.randn(1, cfg.in_chans, size, size))
    grid = size // cfg.patch_size  # 8 for both (base: its 14 x 14 position table interpolated)
    assert detector.backbone.out_channels == channels
    assert {name: tuple(m.shape) for name, m in maps.items()} == {
        "up4": (1, channels, 4 * grid, 4 * grid), "up2": (1, channels, 2 * grid, 2 * grid),
        "same": (1, channels, grid, grid), "down2": (1, channels, grid // 2, grid // 2),
        "pool": (1, channels, grid // 4, grid // 4)}


def test_anchors_and_the_detector_transform_follow_the_input_size():
    cfg = MaCoConfig.preset("tiny")
    run = synthetic_run(recipe="synthetic-1", img_size=64, pyramid_channels=8, box_head_width=16, proposals=20,
                        rois_per_image=8)
    detector = dt.build_detector(new_encoder(cfg), run, 1)
    assert detector.rpn.anchor_generator.sizes == ((2.0,), (4.0,), (8.0,), (16.0,), (32.0,))  # 32..512 x 64/1024
    transform = detector.transform
    assert transform.min_size == (64,) and transform.max_size == 64
    assert transform.image_mean == [0.4978] and transform.image_std == [0.2449]
    image = torch.rand(1, 64, 64)
    batched, _ = transform([image])
    assert torch.allclose(batched.tensors[0], (image - 0.4978) / 0.2449, atol=1e-6)  # normalised, not resized


def test_the_aligned_roi_align_is_torchvisions_on_boxes_shifted_half_a_feature_pixel():
    torch.manual_seed(0)
    features = {name: torch.randn(2, 3, 16 >> k, 16 >> k) for k, name in enumerate(dt.LEVELS)}  # strides 4..32 of 64
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 28.0], [10.0, 12.0, 22.0, 40.0]]), torch.tensor([[0.0, 0.0, 20.0, 24.0]])]
    common = dict(featmap_names=list(dt.LEVELS), output_size=7, sampling_ratio=2, canonical_scale=224, canonical_level=4)
    aligned = dt.AlignedRoIAlign(**common)(features, boxes, [(64, 64)] * 2)
    # a 20-30 pixel box maps to the finest level (stride 4): aligned=True samples where aligned=False would with
    # the box moved by -0.5 feature pixels = -2 image pixels
    plain = dt.MultiScaleRoIAlign(**common)(features, [b - 2.0 for b in boxes], [(64, 64)] * 2)
    assert aligned.shape == (3, 3, 7, 7) and torch.allclose(aligned, plain, atol=1e-6)


def test_the_box_loss_beta_gives_torchvisions_loss_at_one_ninth_and_l1_at_zero():
    cfg = MaCoConfig.preset("tiny")
    images = [torch.rand(1, 64, 64) for _ in range(2)]
    targets = [dict(boxes=torch.tensor([[8.0, 20.0, 28.0, 36.0]]), labels=torch.tensor([1])) for _ in images]

    def losses(beta, torchvision_heads=False):
        torch.manual_seed(0)
        run = synthetic_run(recipe="synthetic-1", pyramid_channels=8, box_head_width=16, box_loss_beta=beta)
        detector = dt.build_detector(new_encoder(cfg), run, 1).train()
        if torchvision_heads:
            detector.rpn.__class__ = dt.RegionProposalNetwork
            detector.roi_heads.__class__ = dt.RoIHeads
        torch.manual_seed(1)  # the same anchor and RoI samples
        return {k: v.item() for k, v in detector(images, targets).items()}
    ninth, zero, reference = losses(1 / 9), losses(0.0), losses(1 / 9, torchvision_heads=True)
    assert ninth == reference
    assert zero["loss_classifier"] == ninth["loss_classifier"]
    for name in ("loss_box_reg", "loss_rpn_box_reg"):  # L1 >= smooth L1 (beta 1/9) elementwise
        assert zero[name] > ninth[name] > 0


def test_the_rsna_recipe_runs_on_a_tiny_copy(tmp_path, capsys):
    make_rsna(tmp_path)  # positives: ids 0, 3, 6 and 9
    lists = tmp_path / "DatasetsSplits" / "RSNA_Pneumonia"
    for name, ids in (("train_list", IDS[:6]), ("val_list", IDS[6:9]), ("test_list", IDS[9:11])):
        write_text(lists / f"{name}.txt", "".join(f"stage_2_train_images/{i}.dcm 0 \n" for i in ids))
    out = tmp_path / "out"
    assert dt.main(["--recipe", "rsna-100", "--root", str(tmp_path), "--split-dir", str(tmp_path / "DatasetsSplits"),
                    "--scratch", "--preset", "tiny", "--img-size", "64",
                    "--steps", "2", "--eval-interval", "1", "--batch-size", "2", "--pyramid-channels", "8",
                    "--box-head-width", "16", "--proposals", "20", "--pre-nms-train", "40", "--rois-per-image", "8",
                    "--workers", "0", "--n-boot", "10", "--examples", "0", "--out-dir", str(out)]) == 0
    (run,) = json.loads((out / "metrics.json").read_text())["runs"]
    assert run["tested_step"] == run["best_step"] and run["weights"].endswith("best.pt")
    weights = torch.load(run["weights"], weights_only=False)
    assert weights["detect_config"]["decay_exempt"] == "released_vitdet" and weights["detect_config"]["box_loss_beta"] == 0
    assert "backbone.vit.encoder.pos_embed" in weights["detector"]


# The RSNA recipes as the released ViTDet config (mask_rcnn_vitdet_b_50ep_maco.py) and detectron2's defaults give
# them (docs/detection.md §2 cites each): a change to a synthetic recipe must not move them
RELEASED_RSNA = {"rsna-1": dict(lr=5e-4, label_fraction=0.01), "rsna-10": dict(lr=5e-4, label_fraction=0.1),
                 "rsna-100": dict(lr=3e-4, label_fraction=1.0)}
RELEASED_RSNA_ALL = dict(
    steps=5_600, warmup_steps=250, eval_interval=560, preset="base", img_size=1024, batch_size=32, pyramid_channels=256,
    box_head_width=1024, proposals=1000, pre_nms_train=2000, rois_per_image=512, pixel_mean=125.281 / 255,
    pixel_std=63.929 / 255, roi_align_aligned=True, box_loss_beta=0.0, norm_eps=1e-6, cls_token=False,
    train_pos_embed=True, decay_exempt="released_vitdet")
RELEASED_RSNA_FLAGS = dict(min_scale=0.8, max_scale=1.2, drop_path=0.1, weight_decay=0.05, layer_decay=0.7,
                           train_negatives=False, test_weights="best")


@pytest.mark.parametrize("name", sorted(RELEASED_RSNA))
def test_the_rsna_recipes_are_pinned(name, tmp_path):
    run = dt.resolve(dt.DetectConfig(recipe=name, root=str(tmp_path), scratch=True))[0]
    expected = dict(RELEASED_RSNA[name], **RELEASED_RSNA_ALL, **RELEASED_RSNA_FLAGS)
    assert {key: getattr(run, key) for key in expected} == expected
    assert set(dt.RECIPES[name]) - {"data", "root", "ckpt", "scratch", "workers"} == set(RELEASED_RSNA[name]) | set(
        RELEASED_RSNA_ALL)  # every recipe value is pinned


# -- COCO box AP ----------------------------------------------------------------------------------------------------

def ap_of(predictions, truths) -> dict:
    return mt.box_ap_metrics([(np.array(b, float).reshape(-1, 4), np.array(s, float)) for b, s in predictions],
                             [np.array(t, float).reshape(-1, 4) for t in truths], n_boot=20)


def test_one_perfect_box_has_ap_1():
    result = ap_of([([[10, 10, 50, 40]], [0.9])], [[[10, 10, 50, 40]]])
    # precision is tp / (tp + fp + machine epsilon), as pycocotools: 1 to within 1e-15
    assert [result["ap"], result["ap50"], result["ap75"], *result["ap_ci95"]] == pytest.approx([1.0] * 5)


def test_a_box_at_iou_058_counts_at_thresholds_050_and_055_only():
    truth, box = [0, 0, 100, 100], [0, 0, 100, 58]  # IoU 5800 / 10000
    assert mt.box_iou([box], [truth])[0, 0] == pytest.approx(0.58)
    result = ap_of([([box], [0.8])], [[truth]])
    assert result["ap_per_threshold"] == pytest.approx([1.0, 1.0] + [0.0] * 8)
    assert result["ap"] == pytest.approx(0.2) and result["ap75"] == 0.0


def test_a_duplicate_detection_is_a_false_positive():
    truth = [[0, 0, 10, 10]]
    scores, matched = mt.match_detections([[0, 0, 10, 10], [0, 0, 10, 10]], [0.8, 0.9], truth)
    assert scores.tolist() == [0.9, 0.8] and matched[:, 0].all() and not matched[:, 1].any()
    # ranked: 0.9 true positive, 0.8 the duplicate, 0.7 the other image's box: precision 1, 1/2, 2/3 at recall
    # 1/2, 1/2, 1; enveloped: 1 up to recall 0.5 (51 of 101 points), 2/3 above
    other = [[5, 5, 20, 20]]
    result = ap_of([([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8]), (other, [0.7])], [truth, other])
    assert result["ap"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert ap_of([([[0, 0, 10, 10]], [0.9]), (other, [0.7])], [truth, other])["ap"] == pytest.approx(1.0)


def test_an_image_without_truth_adds_only_false_positives():
    found = ([[0, 0, 10, 10]], [0.5])
    assert ap_of([found], [[[0, 0, 10, 10]]])["ap"] == pytest.approx(1.0)
    result = ap_of([found, ([[3, 3, 9, 9]], [0.9])], [[[0, 0, 10, 10]], []])
    assert result["ap"] == pytest.approx(0.5) and result["n_images"] == 2 and result["n_boxes"] == 1
    assert ap_of([([], []), ([], [])], [[[0, 0, 10, 10]], []])["ap"] == 0.0  # nothing detected


def test_box_ap_agrees_with_pycocotools_on_random_cases():
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    rng = np.random.default_rng(0)
    for case in range(5):
        truths, predictions, images, annotations, results = [], [], [], [], []
        for image_id in range(1, 16):
            corners = rng.uniform(0, 80, (rng.integers(0, 4), 2))
            truth = np.concatenate([corners, corners + rng.uniform(5, 30, corners.shape)], 1)  # (K, 4) x1 y1 x2 y2
            boxes = np.concatenate([truth[rng.integers(0, len(truth), rng.integers(0, 6))] if len(truth) else
                                    np.zeros((0, 4)), rng.uniform(0, 80, (rng.integers(0, 3), 4)).cumsum(1) / 2])
            boxes = boxes + rng.normal(0, 2, boxes.shape)
            boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
            scores = rng.uniform(0, 1, len(boxes)).round(3)
            truths.append(truth)
            predictions.append((boxes, scores))
            images.append({"id": image_id, "width": 120, "height": 120})
            annotations += [{"id": len(annotations) + k + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                            for k, (x1, y1, x2, y2) in enumerate(truth)]
            results += [{"image_id": image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
                        for (x1, y1, x2, y2), s in zip(boxes, scores)]
        reference = COCO()
        reference.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "p"}]}
        reference.createIndex()
        evaluation = COCOeval(reference, reference.loadRes(results), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        ours = mt.box_ap_metrics(predictions, truths, n_boot=1)
        assert [ours["ap"], ours["ap50"], ours["ap75"]] == pytest.approx(list(evaluation.stats[:3]), abs=1e-9), case


def test_the_bootstrap_interval_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    truths = [np.array([[10, 10, 30, 30]], float) for _ in range(30)]
    predictions = [(t + rng.normal(0, 3, t.shape), rng.uniform(0, 1, 1)) for t in truths]
    first, again = (mt.box_ap_metrics(predictions, truths, n_boot=200, seed=3) for _ in range(2))
    assert first == again and first["ap_ci95"][0] <= first["ap"] <= first["ap_ci95"][1]


# -- data -----------------------------------------------------------------------------------------------------------

def test_the_label_csv_gives_every_box_of_a_patient_and_none_for_target_0(tmp_path):
    make_rsna(tmp_path)
    boxes = eval_datasets.read_box_labels(tmp_path / "stage_2_train_labels.csv")
    assert len(boxes) == len(IDS)
    assert boxes[IDS[0]].tolist() == [[8, 10, 20, 16], [50, 30, 20, 20]]
    assert boxes[IDS[3]].tolist() == [[8, 10, 20, 16]] and boxes[IDS[1]].shape == (0, 4)


def test_the_hash_split_is_deterministic_and_near_70_10_20():
    assert dt.hash_split("0004cfab-14fd-4e49-80ba-63a80b6bddd6") == "train"  # pinned: the split must never drift
    rng = np.random.default_rng(0)
    splits = [dt.hash_split("-".join(f"{v:x}" for v in rng.integers(0, 2 ** 31, 4))) for _ in range(20_000)]
    shares = {name: splits.count(name) / len(splits) for name in ("train", "validate", "test")}
    assert shares == pytest.approx({"train": 0.7, "validate": 0.1, "test": 0.2}, abs=0.01)


def test_boxes_follow_the_letterbox_and_the_scale_jitter():
    item = eval_datasets.BoxedImage("p", "unused", np.array([[40, 20, 40, 80]], np.float32), width=200, height=100)
    assert dt.letterboxed_boxes(item, 64)[0].tolist() == pytest.approx([12.8, 22.4, 25.6, 48.0])  # x 0.32, 16 padded
    torch.manual_seed(0)
    for _ in range(20):
        image = torch.zeros(1, 64, 64)
        image[:, 20:40, 10:30] = 1.0
        jittered, boxes = dt.scale_jitter(image, torch.tensor([[10.0, 20.0, 30.0, 40.0]]), 0.8, 1.2)
        assert jittered.shape == (1, 64, 64) and boxes.shape == (1, 4)
        x1, y1, x2, y2 = boxes[0].round().int().tolist()
        assert jittered[0, y1 + 1:y2 - 1, x1 + 1:x2 - 1].mean() > 0.9  # the box still frames the bright square
        assert jittered[0, :, :x1 - 1].max() < 0.6 and jittered[0, :, x2 + 1:].max() < 0.6


def test_the_schedule_warms_up_from_one_percent_then_falls_as_a_cosine_to_one_percent():
    assert dt.lr_factor(0, 10, 100) == pytest.approx(0.01)
    assert dt.lr_factor(10, 10, 100) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * 0.1)))
    assert dt.lr_factor(5, 10, 100) == pytest.approx((0.01 + dt.lr_factor(10, 10, 100)) / 2)
    assert dt.lr_factor(100, 10, 100) == pytest.approx(0.01)


# -- bad input ------------------------------------------------------------------------------------------------------

def test_a_negative_width_is_a_clear_error(tmp_path):
    write_text(tmp_path / "labels.csv", f"patientId,x,y,width,height,Target\n{IDS[0]},8.0,10.0,-20.0,16.0,1\n")
    with pytest.raises(ValueError, match=r"row 2: the box of .* has width -20.0 .* must be positive"):
        eval_datasets.read_box_labels(tmp_path / "labels.csv")


def test_a_box_outside_its_image_and_a_dicom_left_over_are_counted_skips(tmp_path, capsys):
    make_rsna(tmp_path)
    boxes = eval_datasets.read_box_labels(tmp_path / "stage_2_train_labels.csv")
    images, dicoms = eval_datasets.index_images(tmp_path)
    items = eval_datasets.boxed_images([IDS[0], IDS[-1]], boxes, images, dicoms, "test")
    assert [item.patient_id for item in items] == [IDS[0]] and items[0].boxes.tolist() == [[8, 10, 20, 16]]
    printed = capsys.readouterr().out
    assert "skipped 1 images still DICOM and 0 not found, of 2" in printed
    assert f"skipped 1 boxes not inside their image, e.g. {IDS[0]} (50.0, 30.0, 20.0, 20.0) in a 64x64" in printed


def test_an_unknown_patient_id_in_a_split_list_is_a_clear_error(tmp_path, capsys):
    make_rsna(tmp_path)
    lists = tmp_path / "DatasetsSplits" / "RSNA_Pneumonia"
    for name, ids in (("train_1", IDS[:4]), ("val_list", IDS[4:6]), ("test_list", IDS[6:8] + ["not-a-patient"])):
        write_text(lists / f"{name}.txt", "".join(f"stage_2_train_images/{i}.dcm 0 \n" for i in ids))
    err = error_of(["--recipe", "rsna-1", "--root", str(tmp_path), "--split-dir", str(tmp_path / "DatasetsSplits"),
                    "--scratch", "--preset", "tiny", "--img-size", "64", "--out-dir", str(tmp_path / "o")], capsys)
    assert "test_list.txt: 1 patientIds are not in stage_2_train_labels.csv (e.g. not-a-patient)" in err


def test_a_checkpoint_of_another_preset_is_a_clear_error(tmp_path, capsys):
    make_rsna(tmp_path)
    write_train_checkpoint(tmp_path / "tiny.pt")
    err = error_of(["--recipe", "rsna-1", "--root", str(tmp_path), "--ckpt", str(tmp_path / "tiny.pt"),
                    "--out-dir", str(tmp_path / "o")], capsys)
    assert "is a tiny model, but --recipe rsna-1 uses the base preset" in err


def test_a_synthetic_world_without_boxes_says_how_to_regenerate(tmp_path, capsys):
    write_text(tmp_path / "synthetic-labels.csv", "dicom_id,subject_id,study_id,split,path,consolidation\n")
    err = error_of(["--recipe", "synthetic-1", "--root", str(tmp_path), "--scratch", "--out-dir",
                    str(tmp_path / "o")], capsys)
    assert "without detection boxes" in err and f"python -m world.synthetic --out {tmp_path} --overwrite" in err


def test_the_synthetic_world_writes_consolidation_boxes_for_every_split(synthetic_root):
    boxes = eval_datasets.read_box_labels(synthetic_root / "stage_2_train_labels.csv")
    every = list(dt.read_csv(synthetic_root / "synthetic-boxes.csv", ["dicom_id", "split", "finding"]))
    assert {row["split"] for row in every} == {"train", "validate", "test"}
    consolidation = [row for row in every if row["finding"] == "consolidation"]
    assert sum(len(b) for b in boxes.values()) == len(consolidation) > 0
    assert len(boxes) == 160  # every study, with or without a box


# -- training -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_short_run_lowers_the_loss():
    torch.manual_seed(0)
    cfg = MaCoConfig.preset("tiny")
    run = synthetic_run(img_size=64, pyramid_channels=16, box_head_width=32, proposals=50, pre_nms_train=50,
                        rois_per_image=32, lr=1e-3, steps=12, warmup_steps=2, eval_interval=100, drop_path=0.0,
                        precision="fp32")
    detector = dt.build_detector(new_encoder(cfg), run, 1)
    images = [torch.rand(1, 64, 64) for _ in range(4)]
    for image in images:
        image[:, 20:36, 8:28] += 1.0
    targets = [dict(boxes=torch.tensor([[8.0, 20.0, 28.0, 36.0]]), labels=torch.tensor([1])) for _ in images]
    history = dt.fit(detector, iter(lambda: (images, targets), None), run, lambda: 0.0, torch.device("cpu"), "test")
    assert len(history["losses"]) == 12 and history["validations"] == {0: 0.0, 12: 0.0}
    assert np.mean(history["losses"][-3:]) < 0.8 * np.mean(history["losses"][:3])


@pytest.mark.slow
def test_detect_end_to_end_on_the_synthetic_world(synthetic_root, tmp_path, capsys):
    write_train_checkpoint(tmp_path / "maco.pt")
    out = tmp_path / "out"
    argv = ["--recipe", "synthetic", "--root", str(synthetic_root), "--ckpt", str(tmp_path / "maco.pt"),
            "--steps", "3", "--warmup-steps", "1", "--eval-interval", "2", "--batch-size", "4",
            "--pyramid-channels", "16", "--box-head-width", "32", "--n-boot", "20", "--examples", "2",
            "--out-dir", str(out), "--figure", str(tmp_path / "docs" / "detection.png")]
    assert dt.main(argv) == 0
    printed = capsys.readouterr().out
    assert "AP (IoU 0.50:0.95) (%)" in printed and "AP50 (%)" in printed and "AP75 (%)" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert [(r["init"], r["label_fraction"]) for r in summary["runs"]] == [
        (init, f) for f in (0.01, 0.1, 1.0) for init in ("maco", "scratch")]
    run = summary["runs"][-1]
    assert {"ap", "ap_ci95", "ap50_ci95", "ap75", "n_images"} <= set(run["test"])
    assert run["train_images"] > summary["runs"][0]["train_images"] >= 1
    assert (out / "detection.png").is_file() and (tmp_path / "docs" / "detection.png").is_file()
    assert (out / "synthetic-100" / "maco" / "best.pt").is_file()
