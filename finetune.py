"""Fine-tuning and linear probing of the image encoder with 1%, 10% and 100% of the labels: the paper's Table 1.

    python finetune.py            # synthetic world, runs/maco/checkpoint.pt against scratch, fine-tuned and probed
    python finetune.py --recipe nih-1 --root /data/NIH --split-dir DatasetsSplits --ckpt runs/maco/checkpoint.pt
    python finetune.py --recipe rsna --root /data/RSNA --split-dir DatasetsSplits --init mae_pretrain_vit_base.pth

The model (docs/method.md §10, as the released `CLS-NIH_ChestX-ray/train.py`): the ViT image encoder with
stochastic depth 0.1, the mean of its patch tokens (no cls token; the encoder's final LayerNorm is dropped, as in
MAE's global-pool classifier), a fresh LayerNorm and a Linear layer to the classes (weights truncated normal, std
2e-5). Fine-tuning trains everything; the linear probe (`--linear-probe`) trains that LayerNorm and Linear on the
frozen encoder's features, computed once per image without augmentation. The synthetic recipe fine-tunes from the
probe's trained head instead of a new one (`--probe-head`, LP-FT): with a few hundred steps a new head learns too
slowly for fine-tuning to pass the probe (docs/finetuning.md).

Training, as released: SGD with momentum 0.9 and no weight decay, linear warm-up then a half cosine, BCE with
logits, gradient-norm clipping at 1.0, batches of 96; RandomResizedCrop and horizontal flips for training, Resize
and CenterCrop for validation and test; grey images normalised with mean 0.4978, std 0.2449. The validation split
picks the best step (mean AUC over classes); the test split gets per-class and macro AUC with a bootstrap 95%
interval. A recipe (`--recipe nih-1`, ...) fills every setting left unset; a recipe without a percentage
(`--recipe nih`) runs all three. Data: NIH ChestX-ray14, CheXpert, RSNA Pneumonia, SIIM-ACR (as classification)
with the released split files (`--split-dir`, docs/datasets.md §2.5, §3.5, §4.4, §5.3), or the synthetic world,
whose training split is subsampled: the first 1%, 10%, 100% of one seeded permutation, so the subsets are nested.
"""

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from backbone import check_encoder_flags, fit_and_select, new_encoder, preset_name, recipe_settings
from data import grey_8bit, to_model_input
from eval_zeroshot import plot_roc
from maco import PRESETS, MaCo, MaCoConfig, load
from util import eval_datasets
from util.checkpoint import check_writable, read_checkpoint, save_checkpoint, write_arrays, write_atomic, write_json
from util.cli import check_options, option, run_script
from util.devices import PRECISIONS, autocast, describe_precision, pick_device, resolve_precision
from util.metrics import classification_metrics, macro_auc
from util.progress import lines_every, progress_interval_option, track
from util.released import read_weights
from util.resume import ResumableRun, Skip, claim, continue_command, fresh_option, state_interval_option
from util.run_guard import OutDirLock, StopSignals
from vit import VisionTransformer

# (learning rate, optimizer steps, warm-up steps) per percentage of the training labels, as released
# (docs/method.md §10). SIIM-ACR was only segmented in the paper: as a classification set it borrows RSNA's schedule
# (one binary finding, a similar size). The synthetic world's learning rates were chosen on its validation split
# (docs/finetuning.md).
SCHEDULES = {
    "nih": {1: (8.5e-3, 2_000, 50), 10: (3e-3, 30_000, 500), 100: (3e-3, 200_000, 5_000)},
    "chexpert": {1: (8e-4, 2_000, 50), 10: (1e-4, 60_000, 1_500), 100: (1e-5, 200_000, 15_000)},
    "rsna": {1: (6.5e-3, 2_000, 50), 10: (6e-4, 10_000, 200), 100: (5e-4, 50_000, 2_000)},
    "siim": {1: (6.5e-3, 2_000, 50), 10: (6e-4, 10_000, 200), 100: (5e-4, 50_000, 2_000)},
    "synthetic": {1: (3e-2, 50, 5), 10: (1e-2, 100, 10), 100: (1e-2, 200, 20)},
}
REAL_DATA = dict(root=None, ckpt=None, scratch=False, linear_probe=False, preset="base", img_size=224, batch_size=96,
                 head_lr_scale=1.0, probe_head=False,
                 crop_scale=0.08, eval_interval=None, probe_lr=0.1, probe_steps=2_000, probe_warmup_steps=100,
                 workers=8, figure=None)
SETTINGS = {name: REAL_DATA for name in ("nih", "chexpert", "rsna", "siim")}
# The tiny preset's 64-pixel input on the CPU. Crops keep at least 80% of the image area: a 64-pixel image has
# little to spare, and a crop that cuts off a costophrenic angle or an apex would contradict the image's label.
# Steps fit the whole default run (2 initialisations x 3 fractions x 2 modes) in 10 minutes on 2 CPU cores (398 s
# measured, docs/finetuning.md).
SETTINGS["synthetic"] = dict(root="data/synthetic", ckpt="runs/maco/checkpoint.pt", scratch=None, linear_probe=None,
                             preset="tiny", img_size=64, batch_size=96, head_lr_scale=1.0, probe_head=True,
                             crop_scale=0.8, eval_interval=25,
                             probe_lr=1.0, probe_steps=500, probe_warmup_steps=25, workers=0, figure=None)
RECIPES = {f"{data}-{pct}": dict(SETTINGS[data], data=data, label_fraction=pct / 100, lr=lr, steps=steps,
                                 warmup_steps=warmup)
           for data, schedule in SCHEDULES.items() for pct, (lr, steps, warmup) in schedule.items()}
GROUPS = {data: [f"{data}-{pct}" for pct in schedule] for data, schedule in SCHEDULES.items()}
@dataclass
class FinetuneConfig:
    recipe: str = option("synthetic", "data set and schedule: <set>-<percent of labels> (nih-1, chexpert-10, ...) or "
                         "<set> for all three percentages", choices=tuple(GROUPS) + tuple(RECIPES))
    root: str = option(None, "dataset folder (recipe: data/synthetic for the synthetic world)")
    split_dir: str = option("", "the released DatasetsSplits folder (or one set's folder in it): "
                            "train_1, train_10, train_list, val_list, test_list .txt; real data only")
    ckpt: str = option(None, "train.py checkpoint or the released maco.pth (with --tokenizer) for the encoder, or a "
                       "finetune.py best.pt (its head too) (recipe: synthetic runs/maco/checkpoint.pt)")
    tokenizer: str = option("", "--ckpt maco.pth: the released mimic_wordpiece.json it was trained with")
    init: str = option("", "MAE ImageNet checkpoint (mae_pretrain_vit_base.pth) for the encoder instead of --ckpt")
    scratch: bool = option(None, "--scratch: random initialisation only; --no-scratch: the checkpoint only "
                           "(recipe: synthetic runs both, real data the checkpoint)")
    linear_probe: bool = option(None, "--linear-probe: train the head only, on the frozen encoder; --no-linear-probe: "
                                "fine-tune only (recipe: synthetic runs both, real data fine-tunes)")
    preset: str = option(None, "model preset of --scratch alone (recipe: tiny synthetic, base real)",
                         choices=tuple(PRESETS))
    label_fraction: float = option(None, "fraction of the training labels (recipe: 0.01, 0.1 or 1: the released "
                                   "train_1, train_10, train_list; others subsample train_list)", above=0, maximum=1)
    lr: float = option(None, "peak learning rate of fine-tuning (recipe)", above=0)
    steps: int = option(None, "fine-tuning optimizer steps; 0 = evaluate the initial model (recipe)", minimum=0)
    warmup_steps: int = option(None, "linear warm-up steps before the cosine (recipe)", minimum=0)
    batch_size: int = option(None, "images per step (recipe: 96, as released; at most the training subset)",
                             minimum=1)
    img_size: int = option(None, "input side in pixels; the encoder must have been built for it "
                           "(recipe: 224 real, 64 synthetic)", minimum=1)
    crop_scale: float = option(None, "smallest RandomResizedCrop area fraction (recipe: 0.08 as released, "
                               "0.8 synthetic)", above=0, maximum=1)
    probe_head: bool = option(None, "fine-tuning starts from the linear probe's trained head instead of a new one "
                              "(LP-FT, Kumar et al. 2022) (recipe: off real data, as released; on synthetic)")
    head_lr_scale: float = option(None, "fine-tuning: the head's learning rate over the encoder's (recipe: 1 real "
                                  "data, as released)", above=0)
    drop_path: float = option(0.1, "stochastic depth of the last encoder block in fine-tuning", minimum=0, below=1)
    weight_decay: float = option(0.0, "SGD weight decay", minimum=0)
    clip_grad: float = option(1.0, "gradient-norm clipping", above=0)
    eval_interval: int = option(None, "steps between validations (recipe: 10 epochs of the training subset, "
                                "as released; synthetic 25)", minimum=1)
    probe_lr: float = option(None, "linear probe: peak learning rate (recipe: 0.1 real, 1.0 synthetic)", above=0)
    probe_steps: int = option(None, "linear probe: optimizer steps (recipe: 2000 real, 500 synthetic)", minimum=0)
    probe_warmup_steps: int = option(None, "linear probe: warm-up steps (recipe)", minimum=0)
    num_classes: int = option(0, "classes of the head; 0 = those of the data (released runs hard-coded 14)",
                              minimum=0)
    out_dir: str = option("runs/finetune", "where metrics.json, the best weights and the ROC plots go; rerunning the "
                          "same command on the same folder continues its table (finished runs are kept, an "
                          "interrupted one resumes)")
    fresh: bool = fresh_option()
    state_interval: int = state_interval_option()
    progress_interval: float = progress_interval_option()
    figure: str = option(None, "AUC against label fraction figure (default <out-dir>/label_efficiency.png; the "
                         "copy in docs/finetuning.md: --figure docs/label_efficiency.png)")
    n_boot: int = option(1000, "bootstrap resamples for the test macro-AUC 95% interval", minimum=1)
    seed: int = option(0, "seed of the label subsets, the head initialisation and the data order", minimum=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    precision: str = option("auto", "bf16 autocast or fp32 (auto: bf16 on GPUs and CPUs with native bf16, see "
                                    "docs/speed.md); the loss and the scores are float32 either way",
                            choices=PRECISIONS)
    workers: int = option(None, "DataLoader worker processes (recipe: 8 real, 0 synthetic)", minimum=0)

    def __post_init__(self):
        check_options(self)
        check_encoder_flags(self, GROUPS)


def resolve(cfg: FinetuneConfig) -> list[FinetuneConfig]:
    """One complete configuration per recipe of cfg.recipe: the recipe's values for every setting left unset."""
    runs = []
    for name, recipe, setting in recipe_settings(cfg, RECIPES, GROUPS):
        if setting.figure is None:
            setting = dataclasses.replace(setting, figure=str(Path(cfg.out_dir) / "label_efficiency.png"))
        if not setting.root:
            raise ValueError(f"--recipe {name} needs --root, the {recipe['data']} dataset folder")
        if recipe["data"] != "synthetic" and not setting.split_dir:
            raise ValueError(f"--recipe {name} needs --split-dir, the released DatasetsSplits folder")
        runs.append(setting)
    return runs


# ----------------------------------------------------------------------------------------------------------
# Data: the released split files (eval_datasets.load_split), the synthetic world, nested label subsets, images

def label_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of the first ceil(fraction * n) items of a seeded permutation of range(n): the same for a seed,
    and nested, since a smaller fraction's subset is a prefix of a larger one's."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} is outside (0, 1]")
    order = np.random.default_rng(seed).permutation(n)
    return order[:max(1, math.ceil(round(fraction * n, 6)))]


def load_data(setting: FinetuneConfig) -> dict:
    """Training subset, validation and test items and the class names of one run's data set and label fraction."""
    data = RECIPES[setting.recipe]["data"]
    if data == "synthetic":
        names = eval_datasets.synthetic_class_names(eval_datasets.check_root(setting.root, "synthetic world"))
        train = eval_datasets.load_synthetic(setting.root, names, "train")
        train = [train[i] for i in label_subset(len(train), setting.label_fraction, setting.seed)]
        val, test = (eval_datasets.load_synthetic(setting.root, names, split) for split in ("validate", "test"))
    else:
        names = eval_datasets.SPLIT_CLASSES[data]
        file = eval_datasets.TRAIN_FILES.get(setting.label_fraction)
        train = eval_datasets.load_split(data, setting.root, setting.split_dir, file or "train_list")
        if file is None:  # another fraction: a nested subsample of the whole training list
            train = [train[i] for i in label_subset(len(train), setting.label_fraction, setting.seed)]
        val, test = (eval_datasets.load_split(data, setting.root, setting.split_dir, name) for name in ("val_list", "test_list"))
    for items, what in ((train, "training"), (val, "validation"), (test, "test")):
        if items[0].labels.shape[0] != len(names):
            raise ValueError(f"the {what} labels have {items[0].labels.shape[0]} classes; {data} has {len(names)}")
    if setting.num_classes and setting.num_classes != len(names):
        raise ValueError(f"--num-classes {setting.num_classes} does not match the data: {data} has {len(names)} "
                         f"classes ({', '.join(names)})")
    overlap = len({item.path for item in train} & {item.path for item in test})
    if overlap:  # the released SIIM lists overlap (docs/datasets.md §4.4)
        print(f"warning: {overlap} test images are also in the training subset; their test AUC is optimistic")
    labels = np.stack([item.labels for item in train])  # (n, C)
    positives = {name: int(np.sum(labels[:, c] == 1)) for c, name in enumerate(names)}
    absent = [name for c, name in enumerate(names) if positives[name] == 0 or np.sum(labels[:, c] == 0) == 0]
    if absent:
        print(f"warning: in the {len(train)} training images of {setting.recipe}, {', '.join(absent)} never "
              f"(or always) occur: their outputs learn only that; their test AUC is still measured")
    return dict(train=train, val=val, test=test, class_names=names, train_positives=positives)


class FinetuneDataset(torch.utils.data.Dataset):
    """(image (in_chans, S, S), labels (C,)) from LabelledImage items. train: RandomResizedCrop to S (area fraction
    in [crop_scale, 1], aspect 3/4-4/3) and a horizontal flip; else the short side to S and a centre crop."""

    def __init__(self, items, size: int, in_chans: int, train: bool = False, crop_scale: float = 0.08):
        self.items, self.size, self.in_chans = items, size, in_chans
        self.augment = v2.Compose([v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True),
                                   v2.RandomHorizontalFlip()]) if train else None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        labels = torch.from_numpy(item.labels)
        if self.augment is None:  # data.preprocess_image with resize="crop": Resize + CenterCrop
            return eval_datasets.load_image(item.path, self.size, self.in_chans, "crop"), labels
        try:
            with Image.open(item.path) as image:
                pixels = np.asarray(self.augment(grey_8bit(image)))  # uint8 (S, S)
        except OSError as error:
            raise ValueError(f"cannot read image {item.path}: {error}") from error
        return to_model_input(pixels, self.in_chans), labels


class EndlessPermutations(torch.utils.data.Sampler):
    """Indices of 0..n-1, a fresh seeded permutation per epoch, epochs back to back without end: a training run
    draws exactly `steps` batches from one DataLoader (a batch may straddle two epochs)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.n, generator=generator).tolist()


# ----------------------------------------------------------------------------------------------------------
# The model: encoder + pooled patch tokens + LayerNorm + Linear

def pool_patch_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Global average pool of the patch tokens, cls excluded: (B, 1 + N, D) -> (B, D)."""
    return tokens[:, 1:].mean(dim=1)


class Head(nn.Module):
    """Pooled features (B, D) -> logits (B, C): LayerNorm, then Linear (truncated normal std 2e-5, zero bias)."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fc = nn.Linear(width, num_classes)
        # as released (timm's trunc_normal_, whose default cut-offs are -2 and 2 in absolute value: at this std,
        # a plain normal). The near-zero start leaves the first steps to the bias and the LayerNorm.
        nn.init.trunc_normal_(self.fc.weight, std=2e-5)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features):
        return self.fc(self.norm(features))


class Classifier(nn.Module):
    """images (B, C_in, S, S) -> logits (B, num_classes). The encoder's final LayerNorm is replaced by the
    identity (the released classifier drops it: MAE's global pool), so the head's LayerNorm normalises the mean of
    the last block's tokens; stochastic depth rises to `drop_path` at the last block."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.encoder.norm = nn.Identity()
        self.encoder.set_drop_path(drop_path)
        self.head = Head(encoder.cls_token.shape[-1], num_classes)

    def features(self, images):
        tokens, _, _ = self.encoder(images)  # (B, 1 + N, D), nothing masked
        return pool_patch_tokens(tokens)  # (B, D)

    def forward(self, images):
        return self.head(self.features(images))


def initialisations(setting: FinetuneConfig) -> list[dict]:
    """[{name, label, encoder, cfg}] in table order: the --ckpt (or --init) encoder unless --scratch, then a random
    encoder of the same shape unless --no-scratch (setting.scratch None: both). A finetune.py checkpoint also brings
    its head and class names."""
    inits = []
    if not setting.scratch:
        if setting.init:
            cfg = MaCoConfig.preset(setting.preset, img_size=setting.img_size)
            model, _ = load(setting.init, into=MaCo(cfg))
            inits.append(dict(name="mae", label=f"MAE ({setting.init})", encoder=model.image_encoder, cfg=cfg))
        elif not setting.ckpt:
            raise ValueError(f"--recipe {setting.recipe}: pass --ckpt, --init or --scratch")
        elif not Path(setting.ckpt).is_file():
            hint = ("run `python train.py` first (it trains the tiny MaCo this compares against scratch), "
                    if setting.ckpt == RECIPES[setting.recipe]["ckpt"] else "")
            raise FileNotFoundError(f"no checkpoint at {setting.ckpt}: {hint}or pass --ckpt PATH, --init PATH or --scratch")
        elif "classifier" in (checkpoint := read_weights(setting.ckpt, "--ckpt")):  # a best.pt of this script
            cfg = MaCoConfig(**checkpoint["model_config"])
            classifier = Classifier(new_encoder(cfg), len(checkpoint["class_names"]))
            classifier.load_state_dict(checkpoint["classifier"])
            inits.append(dict(name="finetuned", label=f"fine-tuned ({setting.ckpt})", encoder=classifier.encoder,
                              cfg=cfg, head=classifier.head, class_names=checkpoint["class_names"]))
        else:
            model, _ = load(setting.ckpt, setting.tokenizer or None)
            encoder, cfg = model.image_encoder, model.cfg
            inits.append(dict(name="maco", label=f"MaCo {preset_name(cfg)} ({setting.ckpt})", encoder=encoder, cfg=cfg))
    if setting.scratch is not False:
        cfg = inits[0]["cfg"] if inits else MaCoConfig.preset(setting.preset, img_size=setting.img_size)
        torch.manual_seed(setting.seed)
        inits.append(dict(name="scratch", label=f"scratch {preset_name(cfg)}", encoder=new_encoder(cfg), cfg=cfg))
    for init in inits:
        cfg = init["cfg"]
        if cfg.img_size != setting.img_size:
            raise ValueError(f"{init['label']} is a {preset_name(cfg)} model for {cfg.img_size}-pixel images, but "
                             f"--recipe {setting.recipe} fine-tunes at {setting.img_size} pixels (the {setting.preset} preset): "
                             f"pass a {setting.preset} checkpoint, or --img-size {cfg.img_size} to use this one")
    return inits


# ----------------------------------------------------------------------------------------------------------
# Training: schedule, loss, one loop for fine-tuning and the linear probe

def finetune_lr(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up to `peak`, then a half cosine reaching 0 at
    the last step (released WarmupCosineSchedule, which is stepped before the optimizer)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, the mean over every known label (NaN = uncertain: left out)."""
    known = ~torch.isnan(labels)
    return F.binary_cross_entropy_with_logits(logits.float()[known], labels[known])


@torch.no_grad()
def predict(model, batches, device, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N, C), sigmoid scores (N, C)) of a model over (inputs, labels) batches."""
    was_training = model.training
    model.eval()
    labels, scores = [], []
    for inputs, targets in batches:
        with autocast(device, precision):
            scores.append(torch.sigmoid(model(inputs.to(device, non_blocking=True)).float()).cpu())
        labels.append(targets)
    model.train(was_training)
    return torch.cat(labels).numpy(), torch.cat(scores).numpy()


def fit(model, batches, steps: int, lr: float, warmup_steps: int, epoch_steps: int, setting: FinetuneConfig, validate,
        save, device, desc: str, run: ResumableRun | None = None, state: dict | None = None) -> dict:
    """backbone.fit_and_select with SGD (momentum 0.9; the head's lr x setting.head_lr_scale) on BCE with logits,
    warm-up + cosine, gradient clipping. Validation (macro AUC) every setting.eval_interval steps (unset: every 10
    epochs of `epoch_steps` steps, as released); each new best is saved (save(step, auc)) and the best weights are
    loaded back at the end."""
    params = [p for p in model.parameters() if p.requires_grad]
    head = {id(p) for p in model.head.parameters()} if isinstance(model, Classifier) else set()
    groups = [dict(params=[p for p in params if id(p) not in head], lr_scale=1.0),
              dict(params=[p for p in params if id(p) in head], lr_scale=setting.head_lr_scale)]
    optimizer = torch.optim.SGD([group for group in groups if group["params"]], lr=lr, momentum=0.9,
                                weight_decay=setting.weight_decay)

    def loss_of(batch):
        inputs, labels = batch
        with autocast(device, setting.precision):
            logits = model(inputs.to(device, non_blocking=True))
        return bce_loss(logits, labels.to(device, non_blocking=True))
    return fit_and_select(model, optimizer, batches, steps, setting.eval_interval or 10 * epoch_steps, loss_of,
                          lambda i: finetune_lr(i + 1, lr, warmup_steps, steps), validate, clip_grad=setting.clip_grad,
                          on_best=save, desc=desc, metric="val AUC", run=run, state=state)


def loader(dataset, batch_size: int, setting: FinetuneConfig, device, sampler=None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=setting.workers,
                                       pin_memory=device.type == "cuda")


def saver(model: Classifier, init: dict, mode: str, data: dict, setting: FinetuneConfig):
    """save(step, val_auc): the classifier's weights and what they are, atomically to <out-dir>/<recipe>/<run>/best.pt
    (the file `--ckpt` takes back)."""
    def save(step: int, val_auc: float) -> None:
        save_checkpoint(run_dir(setting, init, mode) / "best.pt", {
            "classifier": model.state_dict(), "model_config": dataclasses.asdict(init["cfg"]),
            "class_names": list(data["class_names"]), "finetune_config": dataclasses.asdict(setting), "mode": mode,
            "init": init["label"], "step": step, "val_macro_auc": val_auc})
    return save


def run_dir(setting: FinetuneConfig, init: dict, mode: str) -> Path:
    return Path(setting.out_dir) / setting.recipe / f"{init['name']}-{mode}"


def finetune(init: dict, data: dict, setting: FinetuneConfig, device,
             run: ResumableRun | None = None) -> tuple[Classifier, dict]:
    """Fine-tune encoder and head on the training subset (continuing run's state if it has one); returns the model
    at its best validation step."""
    torch.manual_seed(setting.seed)
    model = Classifier(copy.deepcopy(init["encoder"]), len(data["class_names"]), setting.drop_path).to(device)
    if init.get("head") is not None:
        model.head.load_state_dict(init["head"].state_dict())
    state = run.state() if run is not None else None
    train_set = FinetuneDataset(data["train"], setting.img_size, init["cfg"].in_chans, True, setting.crop_scale)
    batch = min(setting.batch_size, len(train_set))
    done = state["step"] * batch if state else 0  # training images drawn before the interruption
    batches = iter(loader(train_set, batch, setting, device, Skip(EndlessPermutations(len(train_set), setting.seed),
                                                                  done)))
    val = loader(FinetuneDataset(data["val"], setting.img_size, init["cfg"].in_chans), setting.batch_size, setting, device)
    history = fit(model, batches, setting.steps, setting.lr, setting.warmup_steps, math.ceil(len(train_set) / batch), setting,
                  lambda: macro_auc(*predict(model, val, device, setting.precision)),
                  saver(model, init, "finetune", data, setting), device,
                  f"{setting.recipe} {init['name']} fine-tune", run, state)
    return model, dict(history, batch_size=batch)


@torch.no_grad()
def features_of(model: Classifier, items, setting: FinetuneConfig, device, cache: dict) -> torch.Tensor:
    """Pooled features (N, D) of the frozen encoder, without augmentation; each image is encoded once (cache)."""
    todo = [item for item in dict((item.path, item) for item in items).values() if item.path not in cache]
    if todo:
        dataset = FinetuneDataset(todo, setting.img_size, model.encoder.patch_embed.proj.in_channels)
        model.eval()
        done = 0
        for images, _ in track(loader(dataset, setting.batch_size, setting, device), "features"):
            with autocast(device, setting.precision):
                feats = model.features(images.to(device)).float().cpu()
            for item, feature in zip(todo[done:done + len(feats)], feats):
                cache[item.path] = feature
            done += len(feats)
    return torch.stack([cache[item.path] for item in items])


def linear_probe(init: dict, data: dict, setting: FinetuneConfig, device, cache: dict,
                 run: ResumableRun | None = None) -> tuple[Classifier, dict]:
    """Train a fresh head on the frozen encoder's features (continuing run's state if it has one); returns the
    model at its best validation step."""
    torch.manual_seed(setting.seed)
    model = Classifier(copy.deepcopy(init["encoder"]), len(data["class_names"])).to(device)
    model.encoder.requires_grad_(False)
    if init.get("head") is not None:
        model.head.load_state_dict(init["head"].state_dict())
    split = {name: (features_of(model, data[name], setting, device, cache),
                    torch.from_numpy(np.stack([item.labels for item in data[name]]))) for name in ("train", "val")}
    x, y = split["train"]
    batch = min(setting.batch_size, len(x))
    state = run.state() if run is not None else None

    def feature_batches():
        indices = iter(Skip(EndlessPermutations(len(x), setting.seed), state["step"] * batch if state else 0))
        while True:
            chosen = [next(indices) for _ in range(batch)]
            yield x[chosen], y[chosen]

    val = [split["val"]]
    history = fit(model.head, feature_batches(), setting.probe_steps, setting.probe_lr, setting.probe_warmup_steps,
                  math.ceil(len(x) / batch), setting,
                  lambda: macro_auc(*predict(model.head, val, device, setting.precision)),
                  saver(model, init, "linear-probe", data, setting),
                  device, f"{setting.recipe} {init['name']} probe", run, state)
    return model, dict(history, batch_size=batch)


def finished_probe(init: dict, data: dict, setting: FinetuneConfig, device) -> Classifier:
    """The linear probe of an earlier, finished run of this table, from its best.pt (the weights it ended with)."""
    model = Classifier(copy.deepcopy(init["encoder"]), len(data["class_names"])).to(device)
    model.load_state_dict(read_checkpoint(run_dir(setting, init, "linear-probe") / "best.pt", "the probe's weights")[
        "classifier"])
    return model


# ----------------------------------------------------------------------------------------------------------
# One data set at one label fraction, and the whole experiment

def evaluate_run(model: Classifier, init: dict, mode: str, data: dict, setting: FinetuneConfig, device, history: dict,
                 cache: dict, seconds: float) -> dict:
    """Test metrics of the selected model, and its ROC curves beside its best.pt."""
    folder = run_dir(setting, init, mode)
    if mode == "linear-probe":  # the frozen encoder's features, then the head
        test = [(features_of(model, data["test"], setting, device, cache),
                 torch.from_numpy(np.stack([item.labels for item in data["test"]])))]
        labels, scores = predict(model.head, test, device, setting.precision)
    else:
        test = loader(FinetuneDataset(data["test"], setting.img_size, init["cfg"].in_chans), setting.batch_size, setting, device)
        labels, scores = predict(model, test, device, setting.precision)
    write_arrays(folder / "test_outputs.npz", dict(labels=labels, scores=scores))  # for paired comparisons
    metrics = classification_metrics(labels, scores, data["class_names"], setting.n_boot, setting.seed)
    plot_roc(labels, scores, data["class_names"], folder / "roc_curves.png", metrics["macro_auc"],
             title=f"{setting.recipe}, {init['name']}, {mode}: test ROC")
    losses = history["losses"]
    return dict(recipe=setting.recipe, data=RECIPES[setting.recipe]["data"], label_fraction=setting.label_fraction,
                init=init["name"], init_label=init["label"], mode=mode, train_images=len(data["train"]),
                train_positives=data["train_positives"], val_images=len(data["val"]), batch_size=history["batch_size"],
                best_step=history["best_step"], val_macro_auc=history["best_val"],
                validations=history["validations"], first_loss=losses[0] if losses else None,
                last_loss=float(np.mean(losses[-5:])) if losses else None, seconds=round(seconds, 1),
                weights=str(folder / "best.pt"), test=metrics)


def run_experiment(cfg: FinetuneConfig, stop: StopSignals | None = None, command: str = "") -> dict:
    """Every recipe of cfg.recipe x initialisation x mode, continuing the table in cfg.out_dir (util/resume.py);
    writes metrics.json and the figure; returns the results."""
    start = time.time()
    runs = resolve(cfg)
    device = pick_device(cfg.device)
    print(describe_precision(cfg.precision, device))
    precision = resolve_precision(cfg.precision, device)
    runs = [dataclasses.replace(setting, precision=precision) for setting in runs]
    check_writable(cfg.out_dir, "--out-dir")
    check_writable(Path(runs[0].figure).parent, "--figure")
    inits = initialisations(runs[0])
    # the probe first: with --probe-head, fine-tuning starts from its head
    modes = {True: ["linear-probe"], False: ["finetune"], None: ["linear-probe", "finetune"]}[runs[0].linear_probe]
    table = {(setting.recipe, init["name"], mode): ResumableRun(run_dir(setting, init, mode), setting,
                                                                cfg.state_interval, stop, command)
             for setting in runs for init in inits for mode in modes}
    claim(list(table.values()), cfg.fresh)
    caches = {init["name"]: {} for init in inits}  # frozen features per initialisation, shared by the fractions
    results = []
    for setting in runs:
        data = load_data(setting)
        for init in inits:
            if init.get("class_names") and len(init["class_names"]) != len(data["class_names"]):
                raise ValueError(f"{init['label']} has a head for {len(init['class_names'])} classes; "
                                 f"{setting.recipe} has {len(data['class_names'])}")
            probe = None
            for mode in modes:
                began = time.time()
                run = table[(setting.recipe, init["name"], mode)]
                result = run.result()
                if result is not None:
                    print(f"{setting.recipe} {init['name']} {mode}: finished earlier ({run.folder / 'result.json'})")
                elif mode == "finetune":
                    # LP-FT: the probe first (it saves its own best.pt); a fine-tuned checkpoint keeps its own head
                    from_probe = setting.probe_head and init.get("head") is None
                    if from_probe and probe is None:
                        probe = (finished_probe(init, data, setting, device) if "linear-probe" in modes else
                                 linear_probe(init, data, setting, device, caches[init["name"]])[0])
                    model, history = finetune(dict(init, head=probe.head) if from_probe else init, data, setting,
                                              device, run)
                else:
                    probe, history = linear_probe(init, data, setting, device, caches[init["name"]], run)
                    model = probe
                if result is None:
                    result = evaluate_run(model, init, mode, data, setting, device, history, caches[init["name"]],
                                          time.time() - began)
                    run.finish(result)
                low, high = result["test"]["macro_auc_ci95"]
                print(f"{setting.recipe:<16}{init['name']:<10}{mode:<13} test macro AUC {result['test']['macro_auc']:.3f} "
                      f"[{low:.3f}, {high:.3f}]  (best step {result['best_step']}, {result['seconds']:.0f} s)")
                results.append(result)
                summary = dict(recipe=cfg.recipe, config=dataclasses.asdict(cfg), runs=results,
                               wall_seconds=round(time.time() - start, 1), device=str(device),
                               precision=precision)
                write_json(summary, Path(cfg.out_dir) / "metrics.json")  # after every run: a kill loses little
                run.check_stop()
    plot_label_efficiency(results, runs[0].figure)
    summary["figure"] = runs[0].figure
    return summary


# ----------------------------------------------------------------------------------------------------------
# Outputs: the table shaped like the paper's Table 1, and AUC against label fraction

MODE_NAMES = {"finetune": "fine-tuned", "linear-probe": "linear probe"}


def series(results: list[dict]) -> dict:
    """{(init label, mode): {(data, label fraction): (AUC, low, high)}}, in the order the runs were made."""
    lines = {}
    for r in results:
        lines.setdefault((r["init_label"], r["mode"]), {})[(r["data"], r["label_fraction"])] = (
            r["test"]["macro_auc"], *r["test"]["macro_auc_ci95"])
    return lines


def auc_table(results: list[dict]) -> str:
    """Test macro AUC (%) with its bootstrap 95% interval: a row per initialisation and mode, a column per label
    fraction of each data set (the layout of the paper's Table 1)."""
    lines = series(results)
    columns = sorted({column for points in lines.values() for column in points})
    names = {key: f"{key[0]}, {MODE_NAMES[key[1]]}" for key in lines}
    width = max(map(len, names.values())) + 2
    rows = [f"{'test macro AUC (%) [95% CI]':<{width}}" + "".join(f"{f'{data} {100 * f:g}%':>20}"
                                                                 for data, f in columns)]
    for key, points in lines.items():
        cells = {column: f"{100 * auc:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
                 for column, (auc, low, high) in points.items()}
        rows.append(f"{names[key]:<{width}}" + "".join(f"{cells.get(column, '-'):>20}" for column in columns))
    return "\n".join(rows)


def plot_label_efficiency(results: list[dict], path) -> None:
    """Test macro AUC against the fraction of training labels (log axis), one line per initialisation and mode
    (solid: fine-tuned, dashed: linear probe), bars = bootstrap 95% intervals. A bare Figure, not pyplot (a
    notebook's backend stays as it was)."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(8.5, 4.2))
    axis = figure.subplots()
    lines = series(results)
    colours = {label: f"C{k}" for k, label in enumerate(dict.fromkeys(label for label, _ in lines))}
    for k, ((label, mode), points) in enumerate(lines.items()):
        fraction = np.array([f for _, f in points])
        auc, low, high = np.array(list(points.values())).T
        offset = 1.0 + 0.04 * (k - (len(lines) - 1) / 2)  # spread the bars of one fraction apart
        axis.errorbar(100 * fraction * offset, auc, yerr=[auc - low, high - auc], marker="o", capsize=3,
                      color=colours[label], linestyle="-" if mode == "finetune" else "--",
                      label=f"{label.split(' (')[0]}, {MODE_NAMES[mode]}")
    fractions = sorted({r["label_fraction"] for r in results})
    axis.set_xscale("log")
    axis.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
    axis.set(xlabel="training labels used", ylabel="test macro AUC",
             title=f"Label efficiency: {', '.join(sorted({r['data'] for r in results}))}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110))


def main(argv=None) -> int:
    def body(cfg: FinetuneConfig) -> None:
        # a second finetune.py on the same folder stops at once; SIGTERM or Ctrl-C: state, then exit 143 / 130
        with OutDirLock(cfg.out_dir, "--out-dir"), StopSignals() as stop, lines_every(cfg.progress_interval):
            summary = run_experiment(cfg, stop, continue_command("finetune.py", argv))
        print("\n" + auc_table(summary["runs"]))
        print(f"\n{summary['wall_seconds']:.0f} s; wrote {Path(cfg.out_dir) / 'metrics.json'}, the best weights and "
              f"ROC curves under {cfg.out_dir}" + (f", and {summary['figure']}" if summary["figure"] else ""))
    return run_script(FinetuneConfig, body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
