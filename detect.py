"""Pneumonia detection with the pretrained image encoder at 1%, 10% and 100% of the boxes: the paper's detection
claim (RSNA Pneumonia), on RSNA as downloaded or on the synthetic world.

    python detect.py              # synthetic world: runs/maco/checkpoint.pt against scratch, 1%, 10%, 100% of the boxes
    python detect.py --recipe rsna-10 --root /data/rsna --ckpt maco.pth --tokenizer mimic_wordpiece.json
    python detect.py --recipe rsna --root /data/rsna --init mae_pretrain_vit_base.pth     # MAE ImageNet instead

The model (docs/detection.md): torchvision's Faster R-CNN on the ViT's patch tokens after its last block (backbone.py)
and ViTDet's simple feature pyramid (scales 4, 2, 1, 1/2 and a max-pooled fifth level, 256 channels, LayerNorm). The
released model is a Mask R-CNN whose masks are the box rectangles: boxes carry the same information. Recipe as the
released ViTDet config: AdamW (0.9, 0.999), weight decay 0.05, layer-wise lr decay 0.7, warm-up 250 iterations then a
cosine to 0.01 of the peak, batch 32, 5,600 iterations, input 1024 with scale jitter 0.8-1.2, crop and flip. The
validation split picks the best step; the test split gets COCO box AP, AP50 and AP75 (util/metrics.py) with bootstrap 95%
intervals. Data: stage_2_train_labels.csv with its images (found by patientId under --root), split by a hash of
patientId or by --split-dir lists; or the synthetic world's consolidation boxes and its own split. Images without
pneumonia are left out (as released; --train-negatives trains on them). Training subsets are nested. Results, weights
and the figure go under --out-dir; --figure docs/detection.png also redraws docs/detection.md's copy.
"""

import copy
import dataclasses
import hashlib
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import initLevelMapper

from backbone import (
    DECAY_EXEMPTIONS,
    ViTBackbone,
    check_encoder_flags,
    fit_and_select,
    layer_decay_groups,
    recipe_settings,
    resize_pos_embed,
    set_up_runs,
)
from data import IMAGE_MEAN, IMAGE_STD, check_root, read_csv, resize_to_square
from finetune import EndlessPermutations, label_subset
from maco import PRESETS
from util import eval_datasets
from util.checkpoint import read_arrays, save_checkpoint, write_arrays, write_atomic, write_json
from util.cli import check_options, option, run_script
from util.devices import PRECISIONS, autocast
from util.metrics import box_ap_metrics, interval_table
from util.progress import lines_every, progress_interval_option
from util.resume import ResumableRun, Skip, claim, continue_command, fresh_option, state_interval_option
from util.run_guard import OutDirLock, StopSignals

# (peak lr, iterations, warm-up iterations, validation interval) per percentage of the training images: the released
# ViTDet config (5e-4 at 1% and 10%, 3e-4 at 100%; 5,600 iterations; validation every 560, as its eval_period);
# the synthetic world's fit the default run (3 fractions x 2 initialisations) into 10 minutes on 2 CPU cores.
SCHEDULES = {"rsna": {1: (5e-4, 5_600, 250, 560), 10: (5e-4, 5_600, 250, 560), 100: (3e-4, 5_600, 250, 560)},
             "synthetic": {1: (2e-3, 300, 10, 50), 10: (2e-3, 250, 10, 50), 100: (2e-3, 700, 10, 100)}}
SETTINGS = {
    # as the released ViTDet config and detectron2's defaults it builds on (docs/detection.md §2 cites each)
    "rsna": dict(root=None, ckpt=None, scratch=False, preset="base", img_size=1024, batch_size=32,
                 pyramid_channels=256, box_head_width=1024, proposals=1000, pre_nms_train=2000, rois_per_image=512,
                 workers=8, pixel_mean=125.281 / 255, pixel_std=63.929 / 255, roi_align_aligned=True,
                 box_loss_beta=0.0, norm_eps=1e-6, cls_token=False, train_pos_embed=True, decay_exempt="released_vitdet"),
    # the tiny encoder's own 64-pixel input (8 x 8 patches); a pyramid and box head as much narrower than ViTDet's
    # as the tiny encoder is (192 = 768 / 4 wide: 64 channels, 256 features); fewer proposals and sampled RoIs for
    # the 4,092 anchors and one or two true boxes of a 64-pixel image (a 1024-pixel one has 261,888 anchors): 100
    # and 64 cost 0.20 s per iteration against 0.32 s with 200 and 128, time spent on more iterations instead
    # (docs/detection.md §5: the detector learns slowly at first whatever the data). The pretraining's pixel
    # statistics, position table (fixed) and cls token, torchvision's RoIAlign and box loss, PyTorch's LayerNorm eps
    # and weight-decay exemptions: the choices docs/detection.md's synthetic numbers were measured with.
    "synthetic": dict(root="data/synthetic", ckpt="runs/maco/checkpoint.pt", scratch=None, preset="tiny", img_size=64,
                      batch_size=8, pyramid_channels=64, box_head_width=256, proposals=100, pre_nms_train=100,
                      rois_per_image=64, workers=0, pixel_mean=IMAGE_MEAN, pixel_std=IMAGE_STD,
                      roi_align_aligned=False, box_loss_beta=1 / 9, norm_eps=1e-5, cls_token=True,
                      train_pos_embed=False, decay_exempt="norms_biases_tokens"),
}
RECIPES = {f"{data}-{pct}": dict(SETTINGS[data], data=data, label_fraction=pct / 100, lr=lr, steps=steps,
                                 warmup_steps=warmup, eval_interval=interval)
           for data, schedule in SCHEDULES.items() for pct, (lr, steps, warmup, interval) in schedule.items()}
GROUPS = {data: [f"{data}-{pct}" for pct in schedule] for data, schedule in SCHEDULES.items()}
LABELS_CSV = "stage_2_train_labels.csv"
RELEASED_INPUT = 1024  # the released input side: anchor sizes and the RoI level rule scale with img_size / 1024
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one per pyramid level, at the released input side
LEVELS = ("up4", "up2", "same", "down2")  # the pyramid's levels by their scale of the patch grid; then "pool"


@dataclass
class DetectConfig:
    recipe: str = option("synthetic", "data set and schedule: rsna-1, rsna-10, rsna-100, synthetic-1, ... or rsna / "
                         "synthetic for all three percentages", choices=tuple(GROUPS) + tuple(RECIPES))
    root: str = option(None, f"folder holding {LABELS_CSV} and, anywhere below it, the images as <patientId>.png "
                       "or .jpg (recipe: data/synthetic)")
    split_dir: str = option("", "lists in the released DatasetsSplits format (train_1, train_10, train_list, "
                            "val_list, test_list .txt; '<path>/<patientId>.dcm <Target>' lines) instead of the "
                            "patientId hash; RSNA only")
    ckpt: str = option(None, "train.py checkpoint or the released maco.pth (with --tokenizer) for the encoder "
                       "(recipe: synthetic runs/maco/checkpoint.pt)")
    tokenizer: str = option("", "--ckpt maco.pth: the released mimic_wordpiece.json it was trained with")
    init: str = option("", "MAE ImageNet checkpoint (mae_pretrain_vit_base.pth) for the encoder instead of --ckpt")
    scratch: bool = option(None, "--scratch: random encoder only; --no-scratch: the checkpoint only "
                           "(recipe: synthetic both, RSNA the checkpoint)")
    preset: str = option(None, "model preset; a checkpoint must be of it (recipe: tiny synthetic, base RSNA)",
                         choices=tuple(PRESETS))
    label_fraction: float = option(None, "fraction of the training images (recipe: 0.01, 0.1, 1; nested)", above=0,
                                   maximum=1)
    img_size: int = option(None, "input side: images are letterboxed to it; a multiple of the patch size "
                           "(recipe: 1024 RSNA, 64 synthetic)", minimum=1)
    lr: float = option(None, "peak learning rate (recipe)", above=0)
    steps: int = option(None, "training iterations; 0 = evaluate the initial model (recipe)", minimum=0)
    warmup_steps: int = option(None, "warm-up iterations, from 0.01 of the peak (recipe: 250 RSNA)", minimum=0)
    eval_interval: int = option(None, "iterations between validations (recipe: 560 RSNA)", minimum=1)
    batch_size: int = option(None, "images per iteration (recipe: 32 as released, 8 synthetic)", minimum=1)
    min_scale: float = option(0.8, "scale jitter of training images: smallest factor (released 0.8)", above=0)
    max_scale: float = option(1.2, "scale jitter: largest factor; then a random crop or padding (released 1.2)",
                              above=0)
    pyramid_channels: int = option(None, "channels of every pyramid level (recipe: 256 as ViTDet, 64 synthetic)",
                                   minimum=1)
    box_head_width: int = option(None, "width of the two-layer box head (recipe: 1024, 256 synthetic)", minimum=1)
    proposals: int = option(None, "RPN proposals kept per image after NMS, and per level before it at test time "
                            "(recipe: 1000 as ViTDet, 100 synthetic)", minimum=1)
    pre_nms_train: int = option(None, "RPN proposals kept per level before NMS in training (recipe: 2000 as ViTDet, "
                                "100 synthetic)", minimum=1)
    rois_per_image: int = option(None, "proposals sampled per image to train the box head (recipe: 512 as ViTDet, "
                                 "64 synthetic)", minimum=1)
    pixel_mean: float = option(None, "pixel mean of images in [0, 1] (recipe: 125.281 / 255 as released for RSNA, "
                               "the pretraining's 0.4978 synthetic)", minimum=0, maximum=1)
    pixel_std: float = option(None, "pixel standard deviation (recipe: 63.929 / 255 RSNA, 0.2449 synthetic)", above=0)
    roi_align_aligned: bool = option(None, "RoIAlign with detectron2's half-pixel alignment (ROIAlignV2, as "
                                     "released) or torchvision's default (recipe: aligned RSNA, not synthetic)")
    box_loss_beta: float = option(None, "smooth L1 beta of the RPN's and box head's regression losses: 0 is L1 (as "
                                  "released), 1/9 torchvision's (recipe: 0 RSNA, 1/9 synthetic)", minimum=0)
    norm_eps: float = option(None, "epsilon of the pyramid's LayerNorms (recipe: 1e-6 as detectron2's, 1e-5 "
                             "synthetic)", above=0)
    cls_token: bool = option(None, "keep the cls token in the encoder's sequence (recipe: RSNA no, as ViTDet's "
                             "backbone; synthetic yes)")
    train_pos_embed: bool = option(None, "train the (interpolated) position table, as ViTDet's nn.Parameter "
                                   "(recipe: RSNA trained, synthetic fixed)")
    drop_path: float = option(0.1, "stochastic depth of the last encoder block", minimum=0, below=1)
    weight_decay: float = option(0.05, "AdamW weight decay", minimum=0)
    decay_exempt: str = option(None, "parameters without weight decay (recipe: released_vitdet RSNA, norms_biases_tokens "
                           "synthetic): " + "; ".join(f"{name}: {what}" for name, what in DECAY_EXEMPTIONS.items()),
                           choices=tuple(DECAY_EXEMPTIONS))
    layer_decay: float = option(0.7, "layer-wise lr decay: block i gets lr x decay^(depth - i)", above=0, maximum=1)
    test_weights: str = option("best", "weights tested: the best validation step's, or the last step's (the "
                               "released code selects nothing)", choices=("best", "last"))
    train_negatives: bool = option(False, "also train on the images without pneumonia (released: positives only, "
                                   "docs/detection.md)")
    examples: int = option(4, "test images drawn with their true and predicted boxes", minimum=0)
    out_dir: str = option("runs/detect", "where metrics.json, weights and the figure go; rerunning the same command on "
                          "the same folder continues its table (finished runs are kept, an interrupted one resumes)")
    fresh: bool = fresh_option()
    state_interval: int = state_interval_option()
    progress_interval: float = progress_interval_option()
    figure: str = option("", "also draw the figure here (docs/detection.md's copy: docs/detection.png)")
    n_boot: int = option(1000, "bootstrap resamples for the 95% intervals", minimum=1)
    seed: int = option(0, "seed of the training subsets, the new layers and the data order", minimum=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    precision: str = option("auto", "bf16 autocast or fp32 (auto: bf16 on GPUs and CPUs with native bf16, see "
                                    "docs/speed.md); the losses are float32 either way", choices=PRECISIONS)
    workers: int = option(None, "DataLoader worker processes (recipe: 8 RSNA, 0 synthetic)", minimum=0)

    def __post_init__(self):
        check_options(self)
        check_encoder_flags(self, GROUPS)
        if self.min_scale > self.max_scale:
            raise ValueError(f"--min-scale {self.min_scale} is above --max-scale {self.max_scale}")


def resolve(cfg: DetectConfig) -> list[DetectConfig]:
    """One complete configuration per recipe of cfg.recipe: the recipe's values for every setting left unset."""
    runs = []
    for name, recipe, setting in recipe_settings(cfg, RECIPES, GROUPS):
        if not setting.root:
            raise ValueError(f"--recipe {name} needs --root, the RSNA folder ({LABELS_CSV} and the images)")
        if recipe["data"] == "synthetic" and setting.split_dir:
            raise ValueError("--split-dir is for RSNA; the synthetic world has its own split")
        runs.append(setting)
    return runs


# ----------------------------------------------------------------------------------------------------------
# Data: stage_2_train_labels.csv, images found by patientId, the split, letterboxed images and boxes

def hash_split(patient_id: str) -> str:
    """Our split of RSNA (its detection split was never released): u = the first 8 hex digits of
    SHA-256(patientId) / 16^8, in [0, 1); train if u < 0.7, validate if u < 0.8, else test."""
    u = int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) / 16 ** 8
    return "train" if u < 0.7 else "validate" if u < 0.8 else "test"


def split_ids(setting: DetectConfig, root: Path, boxes: dict) -> dict[str, list[str]]:
    """{train, val, test: patientIds}: the --split-dir lists, or else the synthetic world's own split or the hash."""
    if setting.split_dir:
        ids = {}
        for name, file in (("train", eval_datasets.TRAIN_FILES.get(setting.label_fraction, "train_list")),
                           ("val", "val_list"), ("test", "test_list")):
            path = eval_datasets.split_path(setting.split_dir, "rsna", file)
            ids[name] = [Path(image).stem for image, _ in eval_datasets.read_split_file(path, 1)]
            unknown = [i for i in ids[name] if i not in boxes]
            if unknown:
                raise ValueError(f"{path}: {len(unknown)} patientIds are not in {LABELS_CSV} (e.g. {unknown[0]}): "
                                 f"detection needs their boxes (the released classification test_list lists "
                                 f"stage_2_test_images, which have none)")
        return ids
    split_of = hash_split
    if RECIPES[setting.recipe]["data"] == "synthetic":
        split_of = {row["dicom_id"]: row["split"] for row in read_csv(root / eval_datasets.SYNTHETIC_LABELS_CSV,
                                                                      ["dicom_id", "split"])}.get
    return {name: sorted(i for i in boxes if split_of(i) == split)
            for name, split in (("train", "train"), ("val", "validate"), ("test", "test"))}


def load_data(setting: DetectConfig) -> dict:
    """Training subset, validation and test items of one run."""
    root = check_root(setting.root, "detection data")
    if not (root / LABELS_CSV).is_file() and (root / eval_datasets.SYNTHETIC_LABELS_CSV).is_file():
        raise FileNotFoundError(f"{root} is a synthetic world without detection boxes ({LABELS_CSV}; worlds written "
                                f"before detect.py lack it): regenerate it with `python -m world.synthetic --out {root} "
                                f"--overwrite` (and the --studies, --seed, --image-size it had)")
    boxes = eval_datasets.read_box_labels(root / LABELS_CSV)
    images, dicoms = eval_datasets.index_images(root)
    ids = split_ids(setting, root, boxes)
    data = {name: eval_datasets.boxed_images(ids[name], boxes, images, dicoms, f"{name} split of {root}")
            for name in ids}
    for name in ("val", "test") if setting.train_negatives else ("train", "val", "test"):  # as released: positives only
        data[name] = [item for item in data[name] if len(item.boxes)]
    empty = [name for name in data if not data[name]]
    if empty:
        raise ValueError(f"{root}: no image with a pneumonia box in the {' and '.join(empty)} split")
    if not (setting.split_dir and setting.label_fraction in eval_datasets.TRAIN_FILES):  # else the list is the subset
        data["train"] = [data["train"][i] for i in label_subset(len(data["train"]), setting.label_fraction, setting.seed)]
    return data


def letterboxed_boxes(item: eval_datasets.BoxedImage, size: int) -> torch.Tensor:
    """The item's boxes (K, 4) as (x1, y1, x2, y2) in the size x size letterboxed frame (data.resize_to_square)."""
    scale, left, top = eval_datasets.letterbox_geometry(item.width, item.height, size)
    x, y, w, h = torch.from_numpy(item.boxes).T  # each (K,)
    return torch.stack([x * scale + left, y * scale + top, (x + w) * scale + left, (y + h) * scale + top], dim=1)


def scale_jitter(image: torch.Tensor, boxes: torch.Tensor, min_scale: float, max_scale: float,
                 fill: float = IMAGE_MEAN):
    """The released training augmentation (detectron2: RandomFlip, ResizeScale, FixedSizeCrop without padding, then
    the batch's padding): image (C, S, S) in [0, 1], boxes (K, 4). A horizontal flip with probability 1/2; a resize
    by a factor drawn from [min_scale, max_scale]; a random S x S window of a larger image, or a smaller one padded
    at the bottom and right with `fill`, the mean grey (0 after normalisation). Boxes follow, are clipped to the window
    and dropped if less than a pixel wide or high."""
    channels, size, _ = image.shape
    if torch.rand(()) < 0.5:
        boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)
        image = image.flip(-1)
    side = max(1, round(size * (min_scale + (max_scale - min_scale) * torch.rand(()).item())))
    image = F.interpolate(image[None], size=(side, side), mode="bilinear", antialias=True)[0]  # (C, side, side)
    top, left = torch.randint(0, max(side - size, 0) + 1, (2,)).tolist()
    canvas = torch.full((channels, size, size), fill)
    window = image[:, top:top + size, left:left + size]
    canvas[:, :window.shape[1], :window.shape[2]] = window
    boxes = (boxes * side / size - torch.tensor([left, top, left, top])).clamp(0, min(size, side))
    keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    return canvas, boxes[keep]


class DetectionDataset(torch.utils.data.Dataset):
    """(image (in_chans, S, S) in [0, 1], target {boxes (K, 4) float (x1, y1, x2, y2), labels (K,) int64 ones}),
    letterboxed to S. The detector normalises the image itself. jitter: scale_jitter's (min, max, fill) for
    training."""

    def __init__(self, items: list[eval_datasets.BoxedImage], size: int, in_chans: int, jitter: tuple | None = None):
        self.items, self.size, self.in_chans, self.jitter = items, size, in_chans, jitter

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        with Image.open(item.path) as image:
            pixels = resize_to_square(image, self.size)  # uint8 (S, S)
        image, boxes = torch.from_numpy(pixels).float().div(255)[None], letterboxed_boxes(item, self.size)
        if self.jitter:
            image, boxes = scale_jitter(image, boxes, *self.jitter)
        target = dict(boxes=boxes.float(), labels=torch.ones(len(boxes), dtype=torch.int64))
        return image.expand(self.in_chans, -1, -1), target


def collate(batch):
    images, targets = zip(*batch)  # detection batches are lists: each image has its own number of boxes
    return list(images), list(targets)


# ----------------------------------------------------------------------------------------------------------
# The model: ViT -> simple feature pyramid -> torchvision's Faster R-CNN

class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) maps (ViTDet's norm="LN"; its eps is 1e-6)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, W, C) normalised, back


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from the last block alone. forward(images (B, C, S, S)) -> OrderedDict of (B, channels, h, w)
    maps: up4 (4S/p), up2 (2S/p), same (S/p), down2 (S/2p) and pool (S/4p), p the patch size. Up-sampling by
    transposed convolutions (x4: two, with LayerNorm and GELU between), down-sampling by max-pooling; each level
    then a 1x1 and a 3x3 convolution to `channels`, each followed by LayerNorm; pool max-pools down2 (stride 2)."""

    def __init__(self, encoder, channels: int = 256, norm_eps: float = 1e-5, cls_token: bool = True):
        super().__init__()
        self.vit = ViTBackbone(encoder, (len(encoder.blocks) - 1,), cls_token=cls_token)
        width = self.vit.width
        self.out_channels = channels  # read by torchvision's FasterRCNN
        self.rescale = nn.ModuleDict({
            "up4": nn.Sequential(nn.ConvTranspose2d(width, width // 2, 2, stride=2),
                                 ChannelLayerNorm(width // 2, eps=norm_eps),
                                 nn.GELU(), nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2)),
            "up2": nn.ConvTranspose2d(width, width // 2, 2, stride=2),
            "same": nn.Identity(),
            "down2": nn.MaxPool2d(2, stride=2)})
        widths = {"up4": width // 4, "up2": width // 2, "same": width, "down2": width}
        self.project = nn.ModuleDict({name: nn.Sequential(
            nn.Conv2d(widths[name], channels, 1, bias=False), ChannelLayerNorm(channels, eps=norm_eps),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), ChannelLayerNorm(channels, eps=norm_eps))
            for name in LEVELS})

    def forward(self, images):
        tokens = self.vit(images)[0]  # (B, D, S/p, S/p) after the last block
        maps = OrderedDict((name, self.project[name](self.rescale[name](tokens))) for name in LEVELS)
        maps["pool"] = F.max_pool2d(maps["down2"], kernel_size=1, stride=2)  # detectron2's LastLevelMaxPool
        return maps


class AlignedRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same levels, same level rule) sampling as detectron2's ROIAlignV2:
    roi_align(aligned=True), a box's corners shifted by half a feature pixel so that a pixel's centre lies at +0.5.
    torchvision's own forward always samples with aligned=False."""

    def forward(self, x: dict, boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        features = [x[name] for name in self.featmap_names]
        height = max(h for h, _ in image_shapes)
        scales = [2.0 ** round(math.log2(feature.shape[-2] / height)) for feature in features]  # 1/4 ... 1/32
        levels = initLevelMapper(int(-math.log2(scales[0])), int(-math.log2(scales[-1])), self.canonical_scale,
                                 self.canonical_level)(boxes)  # (R,) each box's level
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])  # (R, 5)
        pooled = features[0].new_zeros((len(rois), features[0].shape[1]) + tuple(self.output_size))  # (R, C, 7, 7)
        for level, (feature, scale) in enumerate(zip(features, scales)):
            index = torch.where(levels == level)[0]
            pooled[index] = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio,
                                      aligned=True).to(pooled.dtype)
        return pooled


def smooth_l1(predicted: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth L1: 0.5 x^2 / beta where |x| < beta, else |x| - beta / 2; beta 0 is the L1 loss."""
    return F.l1_loss(predicted, target, reduction="sum") if beta == 0 else F.smooth_l1_loss(
        predicted, target, beta=beta, reduction="sum")


class BoxLossRPN(RegionProposalNetwork):
    """torchvision's RPN with the box-regression loss's beta a setting (torchvision fixes 1/9; detectron2's
    ViTDet uses 0, the L1 loss); the same sampling and normalisation (the sampled anchors' count)."""
    box_loss_beta = 1 / 9

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        positives, negatives = self.fg_bg_sampler(labels)
        positives, negatives = torch.where(torch.cat(positives))[0], torch.where(torch.cat(negatives))[0]
        sampled = torch.cat([positives, negatives])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        box_loss = smooth_l1(pred_bbox_deltas[positives], regression_targets[positives], self.box_loss_beta)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss / sampled.numel()


class BoxLossRoIHeads(RoIHeads):
    """torchvision's RoI heads with the box-regression loss's beta a setting (as BoxLossRPN); inference as
    torchvision's."""
    box_loss_beta = 1 / 9

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)  # (R, classes), (R, 4 * classes)
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        positive = torch.where(labels > 0)[0]
        box_regression = box_regression.reshape(len(labels), -1, 4)[positive, labels[positive]]  # (P, 4)
        box_loss = smooth_l1(box_regression, regression_targets[positive], self.box_loss_beta) / labels.numel()
        return [], {"loss_classifier": F.cross_entropy(class_logits, labels), "loss_box_reg": box_loss}


def build_detector(encoder, setting: DetectConfig, in_chans: int) -> FasterRCNN:
    """Faster R-CNN (2 classes: background, pneumonia) on a fresh copy of the encoder, its position table
    interpolated to the input grid (trained or fixed). Anchors 32..512 (one size per level, ratios 1:2, 1:1, 2:1)
    and the RoI level rule (a 224-pixel box to the stride-p level) scale with img_size / 1024. torchvision's own
    transform only normalises (setting.pixel_mean, pixel_std): min_size = max_size = img_size, the size the images
    already have."""
    torch.manual_seed(setting.seed)
    encoder = copy.deepcopy(encoder)
    encoder.set_drop_path(setting.drop_path)
    if setting.img_size % encoder.patch_size:
        raise ValueError(f"--img-size {setting.img_size} is not a multiple of the patch size {encoder.patch_size}")
    grid = setting.img_size // encoder.patch_size
    resize_pos_embed(encoder, (grid, grid), trainable=setting.train_pos_embed)
    scale = setting.img_size / RELEASED_INPUT
    anchors = AnchorGenerator(tuple((size * scale,) for size in ANCHOR_SIZES), ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES))
    roi_align = (AlignedRoIAlign if setting.roi_align_aligned else MultiScaleRoIAlign)(
        list(LEVELS), output_size=7, sampling_ratio=0, canonical_scale=224 * scale,
        canonical_level=round(math.log2(encoder.patch_size)))
    pyramid = SimpleFeaturePyramid(encoder, setting.pyramid_channels, setting.norm_eps, setting.cls_token)
    model = FasterRCNN(pyramid, min_size=setting.img_size, max_size=setting.img_size,
                       image_mean=[setting.pixel_mean] * in_chans, image_std=[setting.pixel_std] * in_chans,
                       size_divisible=encoder.patch_size, rpn_anchor_generator=anchors, box_roi_pool=roi_align,
                       box_head=TwoMLPHead(setting.pyramid_channels * 7 * 7, setting.box_head_width),
                       box_predictor=FastRCNNPredictor(setting.box_head_width, 2), box_detections_per_img=100,
                       rpn_pre_nms_top_n_train=setting.pre_nms_train, rpn_pre_nms_top_n_test=setting.proposals,
                       rpn_post_nms_top_n_train=setting.proposals, rpn_post_nms_top_n_test=setting.proposals,
                       box_batch_size_per_image=setting.rois_per_image)
    # FasterRCNN builds its own RPN and RoI heads: give them the box loss with the setting's beta
    model.rpn.__class__, model.roi_heads.__class__ = BoxLossRPN, BoxLossRoIHeads
    model.rpn.box_loss_beta = model.roi_heads.box_loss_beta = setting.box_loss_beta
    return model


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation

def lr_factor(iteration: int, warmup_steps: int, total_steps: int, warmup_factor: float = 0.01,
              final_factor: float = 0.01) -> float:
    """The released schedule (detectron2 WarmupParamScheduler over CosineParamScheduler(1, 0.01)) at 0-based
    `iteration`: a cosine from 1 to final_factor over all iterations; during the warm-up, a line from warmup_factor
    to the cosine's value where the warm-up ends."""
    def cosine(i):
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * i / max(total_steps, 1)))
    if iteration < warmup_steps:
        progress = iteration / warmup_steps
        return warmup_factor * (1 - progress) + cosine(warmup_steps) * progress
    return cosine(iteration)


def loader(dataset, batch_size: int, setting: DetectConfig, device, sampler=None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=setting.workers,
                                       collate_fn=collate, pin_memory=device.type == "cuda")


@torch.no_grad()
def predict(model: FasterRCNN, dataset: DetectionDataset, setting: DetectConfig, device) -> list:
    """[(boxes (N, 4) (x1, y1, x2, y2), scores (N,))] per image of the dataset, N <= 100, in the S x S frame."""
    was_training = model.training
    model.eval()
    predictions = []
    for images, _ in loader(dataset, setting.batch_size, setting, device):
        with autocast(device, setting.precision):
            detections = model([image.to(device) for image in images])
        predictions += [(d["boxes"].float().cpu().numpy(), d["scores"].float().cpu().numpy()) for d in detections]
    model.train(was_training)
    return predictions


def true_boxes(items: list[eval_datasets.BoxedImage], size: int) -> list[np.ndarray]:
    return [letterboxed_boxes(item, size).numpy() for item in items]


def fit(model: FasterRCNN, batches, setting: DetectConfig, validate, device, desc: str,
        run: ResumableRun | None = None, state: dict | None = None) -> dict:
    """backbone.fit_and_select with AdamW and layer-wise lr decay (setting.layer_decay, decay_exempt), the released
    warm-up and cosine, the sum of Faster R-CNN's four losses (RPN objectness and box, RoI class and box);
    validate(): box AP."""
    def loss_of(batch):
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets]
        with autocast(device, setting.precision):
            return sum(model(images, targets).values())
    groups = layer_decay_groups(model.backbone.vit.encoder, model, setting.weight_decay, setting.layer_decay,
                                setting.decay_exempt)
    optimizer = torch.optim.AdamW(groups, lr=setting.lr, betas=(0.9, 0.999))
    return fit_and_select(model, optimizer, batches, setting.steps, setting.eval_interval, loss_of,
                          lambda i: setting.lr * lr_factor(i, setting.warmup_steps, setting.steps), validate,
                          setting.test_weights, desc=desc, metric="val AP", run=run, state=state)


def run_dir(setting: DetectConfig, init: dict) -> Path:
    return Path(setting.out_dir) / setting.recipe / init["name"]


def flat_boxes(predictions: list, truths: list) -> dict[str, np.ndarray]:
    """Per-image predictions [(boxes (N, 4), scores (N,))] and true boxes [(K, 4)] as flat arrays with the image's
    index beside each box (for paired comparisons: util.metrics.box_ap_metrics takes them back per image)."""
    return dict(boxes=np.concatenate([b for b, _ in predictions]).reshape(-1, 4),
                scores=np.concatenate([s for _, s in predictions]),
                box_image=np.concatenate([np.full(len(b), i) for i, (b, _) in enumerate(predictions)]).astype(np.int64),
                truths=np.concatenate(truths).reshape(-1, 4),
                truth_image=np.concatenate([np.full(len(t), i) for i, t in enumerate(truths)]).astype(np.int64),
                n_images=np.array(len(truths)))


def shown_examples(items: list, truths: list, predictions: list, count: int) -> list:
    """The figure's first `count` test images: [(item, true boxes (K, 4), boxes (N, 4), scores (N,))]."""
    return [(item, truth, *found) for item, truth, found in zip(items, truths, predictions)][:count]


def examples_of_finished_run(folder: Path, items: list, size: int, count: int) -> list:
    """shown_examples of a run that finished earlier, from the test predictions it saved (test_outputs.npz)."""
    arrays = read_arrays(folder / "test_outputs.npz")
    predictions = [(arrays["boxes"][arrays["box_image"] == i], arrays["scores"][arrays["box_image"] == i])
                   for i in range(min(count, len(items)))]
    return shown_examples(items, true_boxes(items[:count], size), predictions, count)


def train_and_test(init: dict, data: dict, setting: DetectConfig, device,
                   run: ResumableRun | None = None) -> tuple[dict, list]:
    """Fine-tune on the training subset (continuing run's state if it has one), pick the best validation step,
    test it; returns (result, examples)."""
    began = time.time()
    in_chans = init["cfg"].in_chans
    model = build_detector(init["encoder"], setting, in_chans).to(device)
    state = run.state() if run is not None else None
    train_set = DetectionDataset(data["train"], setting.img_size, in_chans,
                                 (setting.min_scale, setting.max_scale, setting.pixel_mean))
    batch = min(setting.batch_size, len(train_set))
    done = state["step"] * batch if state else 0  # training images drawn before the interruption
    batches = iter(loader(train_set, batch, setting, device, Skip(EndlessPermutations(len(train_set), setting.seed),
                                                                  done)))
    val = DetectionDataset(data["val"], setting.img_size, in_chans)
    history = fit(model, batches, setting, lambda: box_ap_metrics(predict(model, val, setting, device),
                                                              true_boxes(data["val"], setting.img_size), 0)["ap"],
                  device, f"{setting.recipe} {init['name']}", run, state)
    weights = run_dir(setting, init) / f"{setting.test_weights}.pt"
    tested_step = history["best_step"] if setting.test_weights == "best" else setting.steps
    save_checkpoint(weights, {
        "detector": model.state_dict(), "model_config": dataclasses.asdict(init["cfg"]),
        "detect_config": dataclasses.asdict(setting), "init": init["label"], "step": tested_step})
    test_predictions = predict(model, DetectionDataset(data["test"], setting.img_size, in_chans), setting, device)
    truths = true_boxes(data["test"], setting.img_size)
    test = box_ap_metrics(test_predictions, truths, setting.n_boot, setting.seed)
    write_arrays(run_dir(setting, init) / "test_outputs.npz", flat_boxes(test_predictions, truths))
    examples = shown_examples(data["test"], truths, test_predictions, setting.examples)
    losses = history["losses"]
    result = dict(recipe=setting.recipe, data=RECIPES[setting.recipe]["data"], label_fraction=setting.label_fraction,
                  init=init["name"], init_label=init["label"], train_images=len(data["train"]),
                  train_positives=sum(bool(len(item.boxes)) for item in data["train"]),
                  train_boxes=sum(len(item.boxes) for item in data["train"]), val_images=len(data["val"]),
                  best_step=history["best_step"], tested_step=tested_step, val_ap=history["best_val"],
                  validations=history["validations"],
                  first_loss=losses[0] if losses else None, last_loss=float(np.mean(losses[-5:])) if losses else None,
                  seconds=round(time.time() - began, 1), weights=str(weights), test=test)
    return result, examples


def run_experiment(cfg: DetectConfig, stop: StopSignals | None = None, command: str = "") -> dict:
    """Every recipe of cfg.recipe x initialisation, continuing the table in cfg.out_dir (util/resume.py); writes
    metrics.json and the figure; returns the summary."""
    start = time.time()
    runs, device, out_dir, inits = set_up_runs(cfg, resolve(cfg))
    table = {(setting.recipe, init["name"]): ResumableRun(run_dir(setting, init), setting, cfg.state_interval, stop,
                                                          command) for setting in runs for init in inits}
    claim(list(table.values()), cfg.fresh)
    results, examples = [], []
    for setting in runs:
        data = load_data(setting)
        print(f"{setting.recipe}: {len(data['train'])} training images ({sum(len(i.boxes) for i in data['train'])} boxes), "
              f"{len(data['val'])} validation, {len(data['test'])} test images with pneumonia", flush=True)
        for init in inits:
            run = table[(setting.recipe, init["name"])]
            result = run.result()
            if result is None:
                result, shown = train_and_test(init, data, setting, device, run)
                run.finish(result)
            else:
                shown = examples_of_finished_run(run.folder, data["test"], setting.img_size, setting.examples)
                print(f"{setting.recipe} {init['name']}: finished earlier ({run.folder / 'result.json'})")
            test = result["test"]
            print(f"{setting.recipe:<16}{init['label']:<14} test AP {test['ap']:.3f} [{test['ap_ci95'][0]:.3f}, "
                  f"{test['ap_ci95'][1]:.3f}], AP50 {test['ap50']:.3f}  (best step {result['best_step']}, "
                  f"{result['seconds']:.0f} s)", flush=True)
            results.append(result)
            examples.append((f"{init['label']}, {100 * setting.label_fraction:g}%", setting.img_size, shown))
            summary = dict(recipe=cfg.recipe, config=dataclasses.asdict(cfg), runs=results,
                           wall_seconds=round(time.time() - start, 1), device=str(device))
            write_json(summary, out_dir / "metrics.json")  # after every run: a kill loses little
            run.check_stop()
    figures = [out_dir / "detection.png"] + ([Path(cfg.figure)] if cfg.figure else [])
    for path in figures:
        plot_examples(examples, path)
    summary["figures"] = [str(path) for path in figures]
    return summary


# ----------------------------------------------------------------------------------------------------------
# Outputs: the table shaped like the paper's detection table, true and predicted boxes

METRIC_NAMES = {"ap": "AP (IoU 0.50:0.95)", "ap50": "AP50", "ap75": "AP75"}


def plot_examples(rows: list, path, top: int = 3) -> None:
    """A row per run [(title, input size, [(item, true boxes (K, 4), boxes (N, 4), scores (N,))])]: each test
    image letterboxed, its true boxes in green, its `top` highest-scoring predicted boxes in red with their score.
    A bare Figure, not pyplot."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    columns = max((len(shown) for _, _, shown in rows), default=1) or 1
    figure = Figure(figsize=(1.9 * columns, 2.0 * max(len(rows), 1)))
    axes = np.array(figure.subplots(max(len(rows), 1), columns, squeeze=False))
    for axis in axes.flat:
        axis.set_axis_off()
    for row, (title, size, shown) in enumerate(rows):
        for column, (item, truth, boxes, scores) in enumerate(shown):
            axis = axes[row, column]
            with Image.open(item.path) as image:
                axis.imshow(resize_to_square(image, size), cmap="gray", vmin=0, vmax=255)
            for x1, y1, x2, y2 in truth:
                axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1))
            for (x1, y1, x2, y2), score in list(zip(boxes, scores))[:top]:  # scores come sorted, highest first
                axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=0.8))
                axis.text(x1, y1, f"{score:.2f}", color="red", fontsize=5, va="bottom")
        axes[row, 0].set_title(title, fontsize=7, loc="left")
    figure.suptitle(f"test images: true boxes (green), the {top} highest-scoring predictions (red)", fontsize=8)
    figure.tight_layout()
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=120))


def main(argv=None) -> int:
    def body(cfg: DetectConfig) -> None:
        # a second detect.py on the same folder stops at once; SIGTERM or Ctrl-C: state, then exit 143 / 130
        with OutDirLock(cfg.out_dir, "--out-dir"), StopSignals() as stop, lines_every(cfg.progress_interval):
            summary = run_experiment(cfg, stop, continue_command("detect.py", argv))
        print("\n" + interval_table(summary["runs"], METRIC_NAMES))
        print(f"\n{summary['wall_seconds']:.0f} s; wrote {Path(cfg.out_dir) / 'metrics.json'}, the best weights "
              f"under {cfg.out_dir}, and {', '.join(summary['figures'])}")
    return run_script(DetectConfig, body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
