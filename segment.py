"""Pneumothorax segmentation with the pretrained image encoder at 1%, 10% and 100% of the masks: the paper's
segmentation table (SIIM-ACR), on SIIM as downloaded or on the synthetic world.

    python segment.py            # synthetic world: runs/maco/checkpoint.pt against scratch, 1%, 10%, 100% of the masks
    python segment.py --recipe siim-10 --root /data/siim --split-dir DatasetsSplits --ckpt maco.pth \\
        --tokenizer mimic_wordpiece.json
    python segment.py --recipe siim --root /data/siim --split-dir DatasetsSplits --init mae_pretrain_vit_base.pth

The model, as the released mmsegmentation configs (docs/segmentation.md): the ViT's patch tokens after blocks 4, 6,
8 and 12 (backbone.py; the same relative depths for shallower encoders), a simple feature pyramid (x4, x2, x1, x1/2),
a UPerNet head to 2 classes and an auxiliary FCN head on the stride-p level. Loss: sigmoid focal x 2 + Dice x 1
(auxiliary 0.8 + 0.4). AdamW with layer-wise lr decay 0.65, linear warm-up then a linear decay to 0. The validation
split picks the best step (SIIM: per-image Dice, as released); the test split gets the pooled, positive-image and
per-image (medDice) Dice with bootstrap 95% intervals. The synthetic recipe differs where the released one learns
nothing on a set that is mostly negative (docs/segmentation.md §7): balanced sampling, a Dice over the batch,
selection by the pooled Dice. Data: SIIM-ACR's train-rle.csv with images converted to PNG/JPEG anywhere under
--root and the released split lists (whose overlap is removed from training, --keep-overlap keeps it); or the
synthetic world, whose train-rle.csv holds the phantom's pneumothorax masks, subsampled to nested fractions.
Results, weights and figures go under --out-dir; --figure PATH also draws the summary figure there
(docs/segmentation.md's copy: --figure docs/segmentation.png).
"""

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from backbone import (
    DECAY_EXEMPTIONS,
    LAYER_IDS,
    ViTBackbone,
    block_indices_for,
    check_encoder_flags,
    fit_and_select,
    layer_decay_groups,
    recipe_settings,
    resize_pos_embed,
    set_up_runs,
)
from data import read_csv
from finetune import EndlessPermutations, label_subset
from maco import PRESETS
from util import eval_datasets
from util.checkpoint import read_arrays, save_checkpoint, write_arrays, write_atomic, write_json
from util.cli import check_options, option, run_script
from util.devices import PRECISIONS, autocast
from util.metrics import dice_scores, interval_table, overlap_counts, segmentation_metrics
from util.progress import lines_every, progress_interval_option
from util.resume import ResumableRun, Skip, claim, continue_command, fresh_option, state_interval_option
from util.run_guard import OutDirLock, StopSignals

# (learning rate, iterations, warm-up iterations, validation interval) per percentage of the training masks: the
# released configs for SIIM (batch 8 = 4 GPUs x 2); the synthetic world's fit the default run into 10 CPU minutes.
SCHEDULES = {"siim": {1: (5e-6, 1_000, 100, 50), 10: (2e-5, 5_000, 100, 50), 100: (1.5e-5, 160_000, 1_500, 500)},
             "synthetic": {1: (3e-3, 200, 20, 50), 10: (3e-3, 400, 40, 100), 100: (3e-3, 1_000, 100, 100)}}
SETTINGS = {
    "siim": dict(root=None, ckpt=None, scratch=False, preset="base", img_size=512, batch_size=8, head_channels=768,
                 aux_channels=256, workers=8, sampling="uniform", dice="image", select_by="med_dice",
                 train_pos_embed=True, head_init="mmseg"),
    # the tiny encoder's own 64-pixel input (8 x 8 patches; the pyramid's finest level is 32 x 32) and narrow heads:
    # 128 pixels (the released 224 -> 512 doubling) costs 4x more per step than the 10-minute budget allows; the
    # pretraining's fixed position table (no interpolation at 64 pixels) and PyTorch's initialisation of the heads,
    # with which docs/segmentation.md's synthetic numbers were measured
    "synthetic": dict(root="data/synthetic", ckpt="runs/maco/checkpoint.pt", scratch=None, preset="tiny", img_size=64,
                      batch_size=8, head_channels=16, aux_channels=8, workers=0, sampling="balanced", dice="batch",
                      select_by="pooled_dice", train_pos_embed=False, head_init="pytorch"),
}
RECIPES = {f"{data}-{pct}": dict(SETTINGS[data], data=data, label_fraction=pct / 100, lr=lr, steps=steps,
                                 warmup_steps=warmup, eval_interval=interval)
           for data, schedule in SCHEDULES.items() for pct, (lr, steps, warmup, interval) in schedule.items()}
GROUPS = {data: [f"{data}-{pct}" for pct in schedule] for data, schedule in SCHEDULES.items()}
MASKS_CSV = "train-rle.csv"
SAMPLINGS = ("uniform", "balanced")
DICE_LOSSES = ("image", "batch")
HEAD_INITS = ("mmseg", "pytorch")
TEST_WEIGHTS = ("best", "last")
METRIC_NAMES = {"pooled_dice": "pooled Dice", "positive_dice": "Dice, positive images", "med_dice":
                "per-image Dice (medDice)"}
# at each image's own resolution, as the released test.sh (mmseg --eval mDice) computes them, and ours beside them
RELEASED_METRIC_NAMES = {"background_dice": "Dice background", "pooled_dice": "Dice foreground (pooled)",
                         "m_dice": "mDice (mean of the two)", "positive_dice": "Dice, positive images",
                         "med_dice": "per-image Dice (medDice)"}


@dataclass
class SegmentConfig:
    recipe: str = option("synthetic", "data set and schedule: siim-1, siim-10, siim-100, synthetic-1, ... or siim / "
                         "synthetic for all three percentages", choices=tuple(GROUPS) + tuple(RECIPES))
    root: str = option(None, "dataset folder holding train-rle.csv and the images (recipe: data/synthetic)")
    split_dir: str = option("", "the released DatasetsSplits folder (or its SIIM-ACR_Pneumothorax folder); SIIM only")
    keep_overlap: bool = option(False, "keep the test ids that the released train and validation lists also hold")
    ckpt: str = option(None, "train.py checkpoint or the released maco.pth (with --tokenizer) for the encoder "
                       "(recipe: synthetic runs/maco/checkpoint.pt)")
    tokenizer: str = option("", "--ckpt maco.pth: the released mimic_wordpiece.json it was trained with")
    init: str = option("", "MAE ImageNet checkpoint (mae_pretrain_vit_base.pth) for the encoder instead of --ckpt")
    scratch: bool = option(None, "--scratch: random encoder only; --no-scratch: the checkpoint only "
                           "(recipe: synthetic both, SIIM the checkpoint)")
    preset: str = option(None, "model preset; a checkpoint must be of it (recipe: tiny synthetic, base SIIM)",
                         choices=tuple(PRESETS))
    label_fraction: float = option(None, "fraction of the training masks (recipe: 0.01, 0.1, 1: the released "
                                   "train_1, train_10, train_list)", above=0, maximum=1)
    img_size: int = option(None, "input side: images are resized keeping their aspect ratio and padded; a multiple "
                           "of the patch size (recipe: 512 SIIM, 64 synthetic)", minimum=1)
    lr: float = option(None, "peak learning rate (recipe)", above=0)
    steps: int = option(None, "training iterations; 0 = evaluate the initial model (recipe)", minimum=0)
    warmup_steps: int = option(None, "linear warm-up iterations (recipe)", minimum=0)
    eval_interval: int = option(None, "iterations between validations (recipe)", minimum=1)
    batch_size: int = option(None, "images per iteration (recipe: 8, as released)", minimum=1)
    head_channels: int = option(None, "UPerNet head width (recipe: 768 as released, 16 synthetic)", minimum=1)
    aux_channels: int = option(None, "auxiliary FCN head width (recipe: 256 as released, 8 synthetic)", minimum=1)
    aux_head: bool = option(True, "train with the auxiliary FCN head (loss 0.8 focal + 0.4 Dice)")
    sampling: str = option(None, "training images drawn uniformly (as released) or balanced: each draw an image with "
                           "a pneumothorax with probability 1/2 (recipe: uniform SIIM, balanced synthetic)",
                           choices=SAMPLINGS)
    dice: str = option(None, "Dice loss per image (as released: an image without pneumothorax pushes every "
                       "foreground probability to 0) or over the batch's pixels at once (recipe: image SIIM, batch "
                       "synthetic)", choices=DICE_LOSSES)
    select_by: str = option(None, "validation metric that picks the best step (recipe: med_dice SIIM, as released; "
                            "pooled_dice synthetic, which an empty prediction cannot win)", choices=tuple(METRIC_NAMES))
    train_pos_embed: bool = option(None, "train the (interpolated) position table, as the released backbone's "
                                   "nn.Parameter; --no-train-pos-embed keeps it fixed (recipe: SIIM trained, "
                                   "synthetic fixed)")
    head_init: str = option(None, "initialisation of the UPerNet and FCN heads: mmseg (as released: Kaiming fan-out "
                            "convs, classifier N(0, 0.01)) or pytorch's defaults (recipe: mmseg SIIM, pytorch "
                            "synthetic)", choices=HEAD_INITS)
    drop_path: float = option(0.1, "stochastic depth of the last encoder block", minimum=0, below=1)
    weight_decay: float = option(0.05, "AdamW weight decay", minimum=0)
    decay_exempt: str = option("norms_biases_tokens", "parameters without weight decay: " + "; ".join(
        f"{name}: {what}" for name, what in DECAY_EXEMPTIONS.items()), choices=tuple(DECAY_EXEMPTIONS))
    layer_decay: float = option(0.65, "layer-wise lr decay: block i gets lr x decay^(depth - i)", above=0, maximum=1)
    layer_ids: str = option("by_block", "layer ids of the lr decay: " + "; ".join(
        f"{name}: {what}" for name, what in LAYER_IDS.items()), choices=tuple(LAYER_IDS))
    test_weights: str = option("best", "weights tested: the best validation step's, or the last step's (as the "
                               "released test.sh, which loads latest.pth)", choices=TEST_WEIGHTS)
    overlays: int = option(4, "test images drawn with their predicted and true masks", minimum=0)
    out_dir: str = option("runs/segment", "where metrics.json, weights and figures go; rerunning the same command on "
                          "the same folder continues its table (finished runs are kept, an interrupted one resumes)")
    fresh: bool = fresh_option()
    state_interval: int = state_interval_option()
    progress_interval: float = progress_interval_option()
    figure: str = option("", "also draw the summary figure here (docs/segmentation.md's copy: docs/segmentation.png)")
    redraw: bool = option(False, "train nothing: print the table and draw the figures from the results already in "
                          "--out-dir (metrics.json, examples.npz)")
    n_boot: int = option(1000, "bootstrap resamples for the 95% intervals", minimum=1)
    seed: int = option(0, "seed of the mask subsets, the head initialisation and the data order", minimum=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    precision: str = option("auto", "bf16 autocast or fp32 (auto: bf16 on GPUs and CPUs with native bf16, see "
                                    "docs/speed.md); the losses are float32 either way", choices=PRECISIONS)
    workers: int = option(None, "DataLoader worker processes (recipe: 8 SIIM, 0 synthetic)", minimum=0)

    def __post_init__(self):
        check_options(self)
        check_encoder_flags(self, GROUPS)


def resolve(cfg: SegmentConfig) -> list[SegmentConfig]:
    """One complete configuration per recipe of cfg.recipe: the recipe's values for every setting left unset."""
    runs = []
    for name, recipe, setting in recipe_settings(cfg, RECIPES, GROUPS):
        if not setting.root:
            raise ValueError(f"--recipe {name} needs --root, the SIIM-ACR folder (train-rle.csv and the images)")
        if recipe["data"] == "siim" and not setting.split_dir:
            raise ValueError(f"--recipe {name} needs --split-dir, the released DatasetsSplits folder")
        runs.append(setting)
    return runs


# ----------------------------------------------------------------------------------------------------------
# Data: train-rle.csv with its images, the released split lists and their overlap, masks decoded once

def remove_test_overlap(lists: dict[str, list[str]], keep: bool) -> tuple[dict[str, list[str]], list[str]]:
    """lists: {file name: ImageIds} of the training, validation and test lists, in that order. Unless `keep`,
    the test ids are removed from the other two; returns the lists and a line per overlap found."""
    (train_name, train), (val_name, val), (test_name, test) = lists.items()
    test_ids, notes = set(test), []
    in_train, in_val = sum(i in test_ids for i in train), sum(i in test_ids for i in val)
    val_in_train = len(set(val) & set(train))
    if in_train or in_val:
        if keep:
            notes.append(f"warning: kept {in_train} test ids in {train_name} and {in_val} in {val_name} "
                         f"(--keep-overlap): the test Dice of these images is optimistic")
        else:
            notes.append(f"removed {in_train} test ids from {train_name} and {in_val} from {val_name} (the released "
                         f"lists overlap; --keep-overlap keeps them)")
            train, val = [i for i in train if i not in test_ids], [i for i in val if i not in test_ids]
    if val_in_train:
        notes.append(f"note: {val_in_train} {val_name} ids are also in {train_name} (kept: they only make the "
                     f"validation Dice that picks the best step optimistic)")
    return {train_name: train, val_name: val, test_name: test}, notes


def images_with_masks(root) -> dict[str, eval_datasets.LabelledImage]:
    """ImageId -> item (image path, mask regions) for every row of <root>/train-rle.csv whose image is found."""
    root = eval_datasets.check_root(root, "segmentation data")
    return {Path(item.path).stem: item for item in eval_datasets.load_siim(root)}


def pick(items: dict, ids: list[str], source: str) -> list:
    """The items of `ids`, in their order; ids without an image or a mask row are counted and left out."""
    found = [items[i] for i in ids if i in items]
    if not found:
        raise ValueError(f"{source}: none of its {len(ids)} ImageIds has both an image and a row in {MASKS_CSV}")
    if len(found) < len(ids):
        print(f"{source}: {len(ids) - len(found)} of {len(ids)} ImageIds have no image or no mask row; left out")
    return found


def load_data(setting: SegmentConfig) -> dict:
    """Training subset, validation and test items of one setting, and the notes on the split lists' overlap."""
    notes = []
    if RECIPES[setting.recipe]["data"] == "synthetic":
        root = Path(setting.root)
        if (root / eval_datasets.SYNTHETIC_LABELS_CSV).is_file() and not (root / MASKS_CSV).is_file():
            raise FileNotFoundError(f"{root} is a synthetic world without pneumothorax masks ({MASKS_CSV}; worlds "
                                    f"written before segment.py lack it): regenerate it with `python -m world.synthetic "
                                    f"--out {root} --overwrite` (and the --studies, --seed, --image-size it had)")
        items = images_with_masks(root)
        split_of = {row["dicom_id"]: row["split"] for row in read_csv(root / eval_datasets.SYNTHETIC_LABELS_CSV,
                                                                      ["dicom_id", "split"])}
        splits = {name: pick(items, [i for i, s in split_of.items() if s == name], f"{name} split of {root}")
                  for name in ("train", "validate", "test")}
        train, val, test = splits["train"], splits["validate"], splits["test"]
        train = [train[i] for i in label_subset(len(train), setting.label_fraction, setting.seed)]
    else:
        file = eval_datasets.TRAIN_FILES.get(setting.label_fraction, "train_list")
        paths = {name: eval_datasets.split_path(setting.split_dir, "siim", name) for name in (file, "val_list", "test_list")}
        lists = {path.name: [row[0] for row in eval_datasets.read_split_file(path, 0)] for path in paths.values()}
        lists, notes = remove_test_overlap(lists, setting.keep_overlap)
        items = images_with_masks(setting.root)
        train, val, test = (pick(items, ids, name) for name, ids in lists.items())
        if setting.label_fraction not in eval_datasets.TRAIN_FILES:  # another fraction: nested within train_list
            train = [train[i] for i in label_subset(len(train), setting.label_fraction, setting.seed)]
    for line in notes:
        print(line)
    return dict(train=train, val=val, test=test, notes=notes)


def letterbox_content(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a width x height image's content in its size x size letterboxed frame."""
    _, left, top = eval_datasets.letterbox_geometry(width, height, size)
    return left, top, max(1, width * size // max(width, height)), max(1, height * size // max(width, height))


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool (H, W) -> bool (size, size) in the frame of data.resize_to_square(resize="letterbox"): the long side to
    `size`, antialiased (PIL bilinear on the 0/255 mask, then >= 128: the pixel's majority), zero padding."""
    height, width = mask.shape
    left, top, new_w, new_h = letterbox_content(width, height, size)
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((new_w, new_h), Image.Resampling.BILINEAR)
    square = np.zeros((size, size), dtype=bool)
    square[top:top + new_h, left:left + new_w] = np.asarray(resized) >= 128
    return square


def decode_masks(items, size: int, cache: dict) -> None:
    """Fill cache[(path, size)] with the union of the image's regions, decoded at the image's own size and
    letterboxed to size x size, bit-packed (None: no pneumothorax): each mask is decoded once per input size."""
    for item in items:
        if (item.path, size) in cache:
            continue
        packed = None
        if item.rle:
            with Image.open(item.path) as image:
                width, height = image.size
            try:
                mask = eval_datasets.siim_mask(item, height, width)
            except ValueError as error:
                raise ValueError(f"{Path(item.path).stem} in {MASKS_CSV}: {error}. The masks are in the frame of the "
                                 f"original image (1024 x 1024 for SIIM-ACR): convert the DICOM files without "
                                 f"resizing them") from None
            packed = np.packbits(letterbox_mask(mask, size))
        cache[(item.path, size)] = packed


class SegmentationDataset(torch.utils.data.Dataset):
    """(image (in_chans, S, S) normalised, mask (S, S) int64 0/1) letterboxed to S; flip: a horizontal flip of
    both with probability 1/2 (the released training augmentation)."""

    def __init__(self, items, size: int, in_chans: int, masks: dict, flip: bool = False):
        self.items, self.size, self.in_chans, self.masks, self.flip = items, size, in_chans, masks, flip

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        image = eval_datasets.load_image(item.path, self.size, self.in_chans, "letterbox")
        packed = self.masks[(item.path, self.size)]
        mask = torch.zeros(self.size, self.size, dtype=torch.int64) if packed is None else torch.from_numpy(
            np.unpackbits(packed, count=self.size * self.size).reshape(self.size, self.size).astype(np.int64))
        if self.flip and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


class BalancedDraws(torch.utils.data.Sampler):
    """Endless training indices, each drawn from the images with a pneumothorax (`positives`) with probability 1/2,
    else from the others; each group is walked in a fresh seeded permutation per pass. On a set where one image in
    eight is positive, a batch holds four positives on average instead of one."""

    def __init__(self, positives: list[int], negatives: list[int], seed: int):
        if not positives or not negatives:
            raise ValueError("balanced sampling needs images with and without a pneumothorax")
        self.groups, self.seed = (positives, negatives), seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)

        def walk(group):
            while True:
                yield from (group[i] for i in torch.randperm(len(group), generator=generator).tolist())
        streams = [walk(group) for group in self.groups]
        while True:
            yield next(streams[int(torch.rand((), generator=generator) >= 0.5)])


def training_sampler(items, setting: SegmentConfig) -> torch.utils.data.Sampler:
    """The endless sampler of setting.sampling; a subset without positives (or negatives) is drawn uniformly."""
    positives = [i for i, item in enumerate(items) if item.rle]
    negatives = [i for i, item in enumerate(items) if not item.rle]
    if setting.sampling == "balanced" and positives and negatives:
        return BalancedDraws(positives, negatives, setting.seed)
    if setting.sampling == "balanced":
        print(f"{setting.recipe}: the {len(items)} training images are all {'positive' if positives else 'negative'}: "
              f"drawn uniformly")
    return EndlessPermutations(len(items), setting.seed)


# ----------------------------------------------------------------------------------------------------------
# The model: ViT maps -> simple feature pyramid -> UPerNet head (+ auxiliary FCN head), as released

def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmseg's ConvModule with BatchNorm (released: SyncBN): conv without bias, norm, ReLU; `same` padding."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SimpleFeaturePyramid(nn.Module):
    """Four same-width maps (B, D, h, w) -> strides p/4, p/2, p, 2p (released Feature2Pyramid, rescales 4, 2, 1,
    0.5): x4 transposed conv, BatchNorm, GELU, transposed conv; x2 transposed conv; x1 identity; x1/2 max-pool."""

    def __init__(self, width: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.BatchNorm2d(width), nn.GELU(),
                                 nn.ConvTranspose2d(width, width, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]  # (B, D, 4h, 4w) ... (h/2, w/2)


class UPerHead(nn.Module):
    """Pyramid (4 maps of width D, finest first) -> logits (B, classes) at the finest stride (Xiao et al. 2018, the
    released mmseg UPerHead): pyramid pooling (1, 2, 3, 6) on the coarsest map, top-down FPN fusion, a 3x3 conv per
    level, all levels upsampled and fused by a 3x3 conv, dropout 0.1, a 1x1 classifier."""

    def __init__(self, width: int, channels: int, num_classes: int = 2, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.pools = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_bn_relu(width, channels, 1))
                                    for scale in pool_scales])
        self.pool_bottleneck = conv_bn_relu(width + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList([conv_bn_relu(width, channels, 1) for _ in range(3)])
        self.fpn_convs = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in range(3)])
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        coarsest = pyramid[3]  # (B, D, h/2, w/2)
        pooled = [F.interpolate(pool(coarsest), size=coarsest.shape[2:], mode="bilinear", align_corners=False)
                  for pool in self.pools]  # each (B, C, h/2, w/2)
        levels = [lateral(x) for lateral, x in zip(self.laterals, pyramid[:3])]  # (B, C, 4h, 4w), (2h, 2w), (h, w)
        levels.append(self.pool_bottleneck(torch.cat([coarsest] + pooled, dim=1)))  # (B, C, h/2, w/2)
        for i in range(3, 0, -1):  # top-down: each level adds the upsampled coarser one
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[2:], mode="bilinear",
                                                          align_corners=False)
        outputs = [conv(level) for conv, level in zip(self.fpn_convs, levels[:3])] + [levels[3]]
        finest = outputs[0].shape[2:]
        fused = torch.cat([outputs[0]] + [F.interpolate(x, size=finest, mode="bilinear", align_corners=False)
                                          for x in outputs[1:]], dim=1)  # (B, 4C, 4h, 4w)
        return self.classifier(self.dropout(self.fpn_bottleneck(fused)))  # (B, classes, 4h, 4w)


class FCNHead(nn.Module):
    """The auxiliary head on the stride-p map: 3x3 conv, dropout 0.1, 1x1 classifier (released FCNHead, one conv)."""

    def __init__(self, width: int, channels: int, num_classes: int = 2):
        super().__init__()
        self.conv = conv_bn_relu(width, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.dropout(self.conv(x)))  # (B, classes, h, w)


def init_like_mmseg(head: nn.Module) -> None:
    """mmseg 0.25's initialisation of a decode head (the released configs set no init_cfg): every ConvModule's conv
    Kaiming-normal (fan-out, ReLU), its BatchNorm (1, 0); the classifier (conv_seg) N(0, 0.01) with bias 0."""
    for module in head.modules():
        if isinstance(module, nn.Conv2d) and module is not head.classifier:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(head.classifier.weight, std=0.01)
    nn.init.zeros_(head.classifier.bias)


class Segmenter(nn.Module):
    """images (B, C, S, S) -> (logits (B, 2, S, S), auxiliary logits (B, 2, S, S) or None), bilinearly upsampled
    from strides p/4 and p to the input, where the loss and the metrics are computed (as mmseg does)."""

    def __init__(self, encoder, head_channels: int, aux_channels: int, aux_head: bool = True, num_classes: int = 2,
                 head_init: str = "pytorch"):
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init {head_init!r}: expected one of {', '.join(HEAD_INITS)}")
        self.backbone = ViTBackbone(encoder, block_indices_for(len(encoder.blocks)))
        width = self.backbone.width
        self.pyramid = SimpleFeaturePyramid(width)
        self.decode_head = UPerHead(width, head_channels, num_classes)
        self.aux_head = FCNHead(width, aux_channels, num_classes) if aux_head else None
        for head in (self.decode_head, self.aux_head):
            if head is not None and head_init == "mmseg":
                init_like_mmseg(head)

    def forward(self, images):
        size = images.shape[2:]
        pyramid = self.pyramid(self.backbone(images))  # strides p/4, p/2, p, 2p
        logits = F.interpolate(self.decode_head(pyramid), size=size, mode="bilinear", align_corners=False)
        if self.aux_head is None or not self.training:
            return logits, None
        return logits, F.interpolate(self.aux_head(pyramid[2]), size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------------------
# Loss, as released: sigmoid focal x 2.0 + Dice x 1.0 on the foreground (auxiliary head: x 0.8 and x 0.4)

def sigmoid_focal_loss(logits, target, gamma: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """logits (B, K, H, W), target (B, H, W) class indices. Each class channel is a sigmoid against the one-hot
    target; the binary cross-entropy of each element is weighted by alpha (positives) or 1 - alpha (negatives)
    times (1 - p_t)^gamma, which mutes the many easy background pixels; mean over all B*K*H*W elements."""
    logits = logits.float()
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    p = torch.sigmoid(logits)
    p_t = p * one_hot + (1 - p) * (1 - one_hot)
    weight = (alpha * one_hot + (1 - alpha) * (1 - one_hot)) * (1 - p_t) ** gamma
    return (F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none") * weight).mean()


def dice_loss(logits, target, smooth: float = 1.0, exponent: int = 2, per_image: bool = True) -> torch.Tensor:
    """The released mmseg DiceLoss with class_weight [0, 1]: softmax probabilities p of the foreground, per image
    1 - (2 sum(p t) + smooth) / (sum(p^2) + sum(t^2) + smooth), the mean over images, divided by the class count
    (the background term is weighted 0 but still counted). An image without pneumothorax scores
    1 - 1 / (sum(p^2) + 1): every foreground probability is pushed towards 0. per_image=False: one Dice over all
    pixels of the batch (the sums run over the batch too), so an image without pneumothorax only adds its sum(p^2)
    to the denominator of the batch's Dice, as its false positives would to the pooled Dice metric."""
    probabilities = torch.softmax(logits.float(), dim=1)[:, 1].flatten(1)  # (B, H*W)
    truth = (target == 1).float().flatten(1)  # (B, H*W)
    if not per_image:
        probabilities, truth = probabilities.reshape(1, -1), truth.reshape(1, -1)  # (1, B*H*W)
    numerator = 2 * (probabilities * truth).sum(1) + smooth
    denominator = (probabilities ** exponent).sum(1) + (truth ** exponent).sum(1) + smooth
    return (1 - numerator / denominator).mean() / logits.shape[1]


def segmentation_loss(logits, target, focal_weight: float = 2.0, dice_weight: float = 1.0,
                      dice: str = "image") -> torch.Tensor:
    if dice not in DICE_LOSSES:
        raise ValueError(f"dice {dice!r}: expected one of {', '.join(DICE_LOSSES)}")
    return (focal_weight * sigmoid_focal_loss(logits, target)
            + dice_weight * dice_loss(logits, target, per_image=dice == "image"))


# ----------------------------------------------------------------------------------------------------------
# Encoders, the schedule, one training loop with validation-based selection

def segment_lr(iteration: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at 0-based `iteration` (mmcv's poly policy, power 1, min 0, linear warm-up ratio 1e-6):
    peak (1 - i / total), scaled by 1 - (1 - i / warmup)(1 - 1e-6) during the warm-up."""
    lr = peak * (1 - iteration / total_steps)
    if iteration < warmup_steps:
        lr *= 1 - (1 - iteration / warmup_steps) * (1 - 1e-6)
    return lr


def build_segmenter(init: dict, setting: SegmentConfig, device) -> Segmenter:
    """A fresh copy of the encoder, its position table interpolated to the input grid (trained or fixed), with new
    pyramid and heads."""
    torch.manual_seed(setting.seed)
    encoder = copy.deepcopy(init["encoder"])
    encoder.set_drop_path(setting.drop_path)
    grid = setting.img_size // encoder.patch_size
    resize_pos_embed(encoder, (grid, grid), trainable=setting.train_pos_embed)
    return Segmenter(encoder, setting.head_channels, setting.aux_channels, setting.aux_head,
                     head_init=setting.head_init).to(device)


def counts_at_original_size(logits: torch.Tensor, item) -> tuple[np.ndarray, int]:
    """((intersection, predicted, true) pixels, pixel count) of one image at its own size, as mmseg's whole-image
    inference scores it: the letterboxed content of the logits (2, S, S) resized bilinearly to the image's
    H x W, its argmax against the mask decoded at H x W."""
    with Image.open(item.path) as image:
        width, height = image.size
    left, top, new_w, new_h = letterbox_content(width, height, logits.shape[-1])
    content = logits[None, :, top:top + new_h, left:left + new_w]  # (1, 2, new_h, new_w)
    predicted = F.interpolate(content, size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0) == 1
    truth = eval_datasets.siim_mask(item, height, width) if item.rle else np.zeros((height, width), dtype=bool)
    return overlap_counts(predicted[None], truth[None])[0], height * width


@torch.no_grad()
def predict(model: Segmenter, loader, device, precision: str, keep: int = 0, items: list | None = None) -> tuple:
    """(overlap counts (N, 3) of the argmax masks, [(image (S, S), truth, prediction)] of the first `keep` images
    with a pneumothorax) over the batches of `loader`; with `items` (the loader's items, in its order) also the
    counts (N, 3) and pixel counts (N,) at each image's own size (counts_at_original_size)."""
    was_training = model.training
    model.eval()
    counts, kept, original = [], [], []
    for images, masks in loader:
        with autocast(device, precision):
            logits, _ = model(images.to(device, non_blocking=True))
        logits = logits.float()
        predicted = logits.argmax(1).cpu()  # (B, S, S)
        counts.append(overlap_counts(predicted == 1, masks == 1))
        if items is not None:
            for image_logits in logits:
                original.append(counts_at_original_size(image_logits, items[len(original)]))
        for image, truth, prediction in zip(images, masks, predicted):
            if len(kept) < keep and truth.any():
                kept.append((image[0].numpy(), truth.numpy().astype(bool), prediction.numpy().astype(bool)))
    model.train(was_training)
    if items is None:
        return np.concatenate(counts), kept
    return np.concatenate(counts), kept, np.stack([c for c, _ in original]), np.array([n for _, n in original])


def loader(dataset, setting: SegmentConfig, device, sampler=None):
    return torch.utils.data.DataLoader(dataset, batch_size=setting.batch_size, sampler=sampler, num_workers=setting.workers,
                                       pin_memory=device.type == "cuda")


def fit(model: Segmenter, batches, setting: SegmentConfig, validate, device, desc: str = "",
        run: ResumableRun | None = None, state: dict | None = None) -> dict:
    """backbone.fit_and_select with AdamW and layer-wise lr decay (setting.layer_decay, layer_ids, decay_exempt),
    mmcv's poly schedule, focal x 2 + Dice (+ the auxiliary head's 0.8 + 0.4); validate(): the Dice of
    setting.select_by."""
    def loss_of(batch):
        images, masks = (tensor.to(device, non_blocking=True) for tensor in batch)
        with autocast(device, setting.precision):
            logits, aux_logits = model(images)
        loss = segmentation_loss(logits, masks, dice=setting.dice)
        if aux_logits is not None:
            loss = loss + segmentation_loss(aux_logits, masks, focal_weight=0.8, dice_weight=0.4, dice=setting.dice)
        return loss
    groups = layer_decay_groups(model.backbone.encoder, model, setting.weight_decay, setting.layer_decay,
                                setting.decay_exempt, setting.layer_ids)
    optimizer = torch.optim.AdamW(groups, lr=setting.lr, betas=(0.9, 0.999))
    return fit_and_select(model, optimizer, batches, setting.steps, setting.eval_interval, loss_of,
                          lambda i: segment_lr(i, setting.lr, setting.warmup_steps, setting.steps), validate,
                          setting.test_weights, desc=desc, metric=f"val {setting.select_by}", run=run, state=state)


# ----------------------------------------------------------------------------------------------------------
# One recipe and initialisation, the whole experiment

def run_dir(setting: SegmentConfig, init: dict) -> Path:
    return Path(setting.out_dir) / setting.recipe / init["name"]


def train_and_test(init: dict, data: dict, setting: SegmentConfig, masks: dict, device,
                   run: ResumableRun | None = None) -> tuple[dict, list]:
    """Fine-tune on the training subset (continuing run's state if it has one), pick the best validation step,
    test it; returns (result, overlays)."""
    began = time.time()
    model = build_segmenter(init, setting, device)
    in_chans = init["cfg"].in_chans
    state = run.state() if run is not None else None
    done = state["step"] * setting.batch_size if state else 0  # training images drawn before the interruption
    train_set = SegmentationDataset(data["train"], setting.img_size, in_chans, masks, flip=True)
    batches = iter(loader(train_set, setting, device, Skip(training_sampler(data["train"], setting), done)))
    val = loader(SegmentationDataset(data["val"], setting.img_size, in_chans, masks), setting, device)
    history = fit(model, batches, setting,
                  lambda: dice_scores(predict(model, val, device, setting.precision)[0])[setting.select_by],
                  device, f"{setting.recipe} {init['name']}", run, state)
    weights = run_dir(setting, init) / f"{setting.test_weights}.pt"
    tested_step = history["best_step"] if setting.test_weights == "best" else setting.steps
    save_checkpoint(weights, {
        "segmenter": model.state_dict(), "model_config": dataclasses.asdict(init["cfg"]),
        "segment_config": dataclasses.asdict(setting), "init": init["label"], "step": tested_step})
    test = loader(SegmentationDataset(data["test"], setting.img_size, in_chans, masks), setting, device)
    counts, overlays, original, pixels = predict(model, test, device, setting.precision, setting.overlays, data["test"])
    write_arrays(run_dir(setting, init) / "test_outputs.npz",  # for paired comparisons
                 dict(counts=counts, counts_original=original, pixels_original=pixels))
    # the same Dice on (up to 128) training images: the gap to the test Dice is what a test image that is also a
    # training image gains (the released lists' overlap, docs/segmentation.md §5)
    seen = loader(SegmentationDataset(data["train"][:128], setting.img_size, in_chans, masks), setting, device)
    losses = history["losses"]
    result = dict(recipe=setting.recipe, data=RECIPES[setting.recipe]["data"], label_fraction=setting.label_fraction,
                  init=init["name"], init_label=init["label"], train_images=len(data["train"]),
                  train_positives=sum(bool(item.rle) for item in data["train"]), val_images=len(data["val"]),
                  best_step=history["best_step"], tested_step=tested_step, select_by=setting.select_by,
                  val_dice=history["best_val"],
                  validations=history["validations"], first_loss=losses[0] if losses else None,
                  last_loss=float(np.mean(losses[-5:])) if losses else None, split_notes=data["notes"],
                  seconds=round(time.time() - began, 1), weights=str(weights),
                  train_subset=dice_scores(predict(model, seen, device, setting.precision)[0]),
                  test=segmentation_metrics(counts, setting.n_boot, setting.seed),
                  test_original=segmentation_metrics(original, setting.n_boot, setting.seed, pixels=pixels),
                  # what predicting no pneumothorax anywhere scores on this test split: medDice's floor
                  empty_prediction=dice_scores(counts * [0, 0, 1]))
    if overlays:
        plot_overlays(overlays, f"{setting.recipe}, {init['label']}", run_dir(setting, init) / "overlays.png")
    save_examples({init["label"]: overlays}, run_dir(setting, init) / "overlays.npz")  # for a rerun that resumes
    return result, overlays


def run_experiment(cfg: SegmentConfig, stop: StopSignals | None = None, command: str = "") -> dict:
    """Every recipe of cfg.recipe x initialisation, continuing the table in cfg.out_dir (util/resume.py); writes
    metrics.json and the figures; returns the summary."""
    start = time.time()
    runs, device, out_dir, inits = set_up_runs(cfg, resolve(cfg))
    table = {(setting.recipe, init["name"]): ResumableRun(run_dir(setting, init), setting, cfg.state_interval, stop,
                                                          command) for setting in runs for init in inits}
    claim(list(table.values()), cfg.fresh)
    masks, results, examples = {}, [], {}
    for setting in runs:
        data = load_data(setting)
        for split in ("train", "val", "test"):
            decode_masks(data[split], setting.img_size, masks)
        for init in inits:
            run = table[(setting.recipe, init["name"])]
            result = run.result()
            if result is None:
                result, overlays = train_and_test(init, data, setting, masks, device, run)
                run.finish(result)
            else:
                overlays = load_examples(run_dir(setting, init) / "overlays.npz").get(init["label"], [])
                print(f"{setting.recipe} {init['name']}: finished earlier ({run.folder / 'result.json'})")
            test = result["test"]
            print(f"{setting.recipe:<16}{init['label']:<14} test pooled Dice {test['pooled_dice']:.3f} "
                  f"[{test['pooled_dice_ci95'][0]:.3f}, {test['pooled_dice_ci95'][1]:.3f}], positive images "
                  f"{test['positive_dice']:.3f}, medDice {test['med_dice']:.3f}  (best step {result['best_step']}, "
                  f"{result['seconds']:.0f} s)", flush=True)
            results.append(result)
            examples[init["label"]] = overlays  # the largest fraction's, drawn in the summary figure
            summary = dict(recipe=cfg.recipe, config=dataclasses.asdict(cfg), runs=results,
                           wall_seconds=round(time.time() - start, 1), device=str(device))
            write_json(summary, out_dir / "metrics.json")  # after every run: a kill loses little
            run.check_stop()
    save_examples(examples, out_dir / "examples.npz")
    summary["figures"] = draw_figures(results, examples, cfg)
    return summary


def draw_figures(results: list[dict], examples: dict, cfg: SegmentConfig) -> list[str]:
    paths = [Path(cfg.out_dir) / "segmentation.png"] + ([Path(cfg.figure)] if cfg.figure else [])
    for path in paths:
        plot_summary(results, examples, path)
    return [str(path) for path in paths]


def save_examples(examples: dict, path) -> None:
    """The summary figure's overlays {label: [(image, truth, prediction)]} as arrays, for --redraw."""
    write_arrays(path, {f"{k}/{label}/{name}": np.stack([overlay[j] for overlay in overlays])
                        for k, (label, overlays) in enumerate(examples.items()) if overlays
                        for j, name in enumerate(("image", "truth", "prediction"))})


def load_examples(path) -> dict:
    arrays = read_arrays(path)
    keys = sorted({key.rsplit("/", 1)[0] for key in arrays}, key=lambda key: int(key.split("/")[0]))
    return {key.split("/", 1)[1]: list(zip(*(arrays[f"{key}/{name}"] for name in ("image", "truth", "prediction"))))
            for key in keys}


def redraw(cfg: SegmentConfig) -> dict:
    """The summary of an earlier run in --out-dir, with its figures drawn again (and at --figure)."""
    out_dir = Path(cfg.out_dir)
    if not (out_dir / "metrics.json").is_file():
        raise FileNotFoundError(f"--redraw: no {out_dir / 'metrics.json'}; run segment.py with this --out-dir first")
    summary = json.loads((out_dir / "metrics.json").read_text())
    examples = load_examples(out_dir / "examples.npz") if (out_dir / "examples.npz").is_file() else {}
    return dict(summary, figures=draw_figures(summary["runs"], examples, cfg))


# ----------------------------------------------------------------------------------------------------------
# Outputs: the table shaped like the paper's segmentation table, Dice against label fraction, overlays


def draw_overlay(axis, image, truth, prediction) -> None:
    """The grey image with the true mask's outline in green and the predicted mask in translucent red."""
    axis.imshow(image, cmap="gray")
    red = np.zeros(prediction.shape + (4,))
    red[prediction] = (1.0, 0.1, 0.1, 0.45)
    axis.imshow(red)
    axis.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
    axis.set_axis_off()


def plot_overlays(overlays: list, title: str, path) -> None:
    """A row of test images with their true (green outline) and predicted (red) masks. A bare Figure, not pyplot."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(2.4 * len(overlays), 2.8))
    for axis, (image, truth, prediction) in zip(np.atleast_1d(figure.subplots(1, len(overlays))), overlays):
        draw_overlay(axis, image, truth, prediction)
    figure.suptitle(f"{title}: truth (green outline), prediction (red)", fontsize=9)
    figure.tight_layout()
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110))


def plot_summary(results: list[dict], examples: dict, path) -> None:
    """Left: test pooled Dice (solid) and Dice over the positive images (dashed) against the fraction of training
    masks (bars: 95% intervals), a colour per initialisation; right: test overlays of each initialisation at the
    largest fraction, one row each."""
    from matplotlib.figure import Figure
    columns = max((len(v) for v in examples.values()), default=0)
    figure = Figure(figsize=(4.5 + 1.9 * columns, max(3.6, 1.9 * len(examples))))
    grid = figure.add_gridspec(max(1, len(examples)), 1 + columns, width_ratios=[2.4] + [1] * columns)
    axis = figure.add_subplot(grid[:, 0])
    for k, label in enumerate(dict.fromkeys(r["init_label"] for r in results)):
        points = sorted(((r["label_fraction"], r["test"]) for r in results if r["init_label"] == label),
                        key=lambda point: point[0])
        for m, (metric, style) in enumerate((("pooled_dice", "-"), ("positive_dice", "--"))):
            # spread the bars of a fraction apart
            fraction = np.array([100 * f for f, _ in points]) * (1 + 0.03 * (2 * k + m))
            dice = np.array([t[metric] for _, t in points])
            low, high = np.array([t[metric + "_ci95"] for _, t in points]).T
            axis.errorbar(fraction, dice, yerr=[dice - low, high - dice], marker="o", capsize=3, color=f"C{k}",
                          linestyle=style, label=f"{label}, {METRIC_NAMES[metric]}")
    fractions = sorted({r["label_fraction"] for r in results})
    axis.set_xscale("log")
    axis.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
    axis.set(xlabel="training masks used", ylabel="test Dice", ylim=(0, 1),
             title=f"Pneumothorax segmentation: {', '.join(sorted({r['data'] for r in results}))}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    for row, (label, overlays) in enumerate(examples.items()):
        for column, (image, truth, prediction) in enumerate(overlays):
            draw_overlay(figure.add_subplot(grid[row, 1 + column]), image, truth, prediction)
        if overlays:
            figure.axes[-len(overlays)].set_title(f"{label}: truth (green), prediction (red)", fontsize=8, loc="left")
    figure.tight_layout()
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110))


def main(argv=None) -> int:
    def body(cfg: SegmentConfig) -> None:
        # a second segment.py on the same folder stops at once; SIGTERM or Ctrl-C: state, then exit 143 / 130
        with OutDirLock(cfg.out_dir, "--out-dir"), StopSignals() as stop, lines_every(cfg.progress_interval):
            summary = redraw(cfg) if cfg.redraw else run_experiment(cfg, stop, continue_command("segment.py", argv))
        print("\n" + interval_table(summary["runs"], METRIC_NAMES))
        if all("test_original" in r for r in summary["runs"]):
            print("\nAt each test image's own resolution, as the released test.sh (--eval mDice) scores it, with the "
                  "positive-image and per-image Dice beside it:\n"
                  + interval_table(summary["runs"], RELEASED_METRIC_NAMES, key="test_original"))
        empties = {r["data"]: r["empty_prediction"] for r in summary["runs"] if "empty_prediction" in r}
        for data, empty in empties.items():
            print(f"\nPredicting no pneumothorax anywhere scores, on the {data} test split: medDice "
                  f"{100 * empty['med_dice']:.1f}%, pooled Dice {100 * empty['pooled_dice']:.1f}%, positive images "
                  f"{100 * empty['positive_dice']:.1f}%")
        print(f"\n{summary['wall_seconds']:.0f} s; wrote {Path(cfg.out_dir) / 'metrics.json'}, the best weights and "
              f"overlays under {cfg.out_dir}, and {', '.join(summary['figures'])}")
    return run_script(SegmentConfig, body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
