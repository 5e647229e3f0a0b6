"""Why does segment.py's released recipe predict no pneumothorax on the synthetic world? Train one encoder with
segment.py's model and loop, one setting changed at a time, and watch, every --interval steps:

  train positive Dice   per-image Dice on up to 64 training images with a pneumothorax (can it fit what it sees?)
  p inside / outside    mean foreground probability inside and outside the true masks of those images
  p negative            mean foreground probability over up to 64 training images without a pneumothorax
  val pooled / positive / medDice   the validation split's three Dice (what each selection metric would see)

    python -m tools.segment_diagnosis                  # the variants of docs/segmentation.md §7, scratch, 100%
    python -m tools.segment_diagnosis --variants released,balanced --ckpt runs/maco/checkpoint.pt

A variant is `name` from VARIANTS, each a set of segment.py flags over the released recipe's loss, sampling and
selection (the synthetic recipe's schedule). Writes <out-dir>/diagnosis.json and prints one table per variant.
"""

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import segment as sg
from backbone import encoders_to_compare
from util.checkpoint import write_json
from util.cli import option, run_script
from util.devices import autocast, pick_device, resolve_precision
from util.metrics import dice_scores

RELEASED = dict(sampling="uniform", dice="image", select_by="med_dice")
FIXED = dict(sampling="balanced", dice="batch", select_by="pooled_dice")  # the synthetic recipe's three changes
VARIANTS = {  # segment.py settings over the synthetic-100 recipe: one change at a time from the released loss,
    # sampling and selection, then from the synthetic recipe's
    "released": dict(RELEASED),
    "balanced": dict(RELEASED, sampling="balanced"),
    "batch-dice": dict(RELEASED, dice="batch"),
    "balanced+batch-dice": dict(RELEASED, sampling="balanced", dice="batch"),
    "synthetic": dict(FIXED),
    "synthetic+no-layer-decay": dict(FIXED, layer_decay=1.0),
    "synthetic+lr-1e-3": dict(FIXED, lr=1e-3),
    "synthetic+lr-1e-2": dict(FIXED, lr=1e-2),
    "synthetic+no-aux-head": dict(FIXED, aux_head=False),
    "synthetic+128px": dict(FIXED, img_size=128),
}


@dataclass
class DiagnosisConfig:
    variants: str = option("released,balanced,batch-dice,balanced+batch-dice", "comma-separated names of VARIANTS: "
                           + ", ".join(VARIANTS))
    recipe: str = option("synthetic-100", "segment.py recipe the variants change",
                         choices=tuple(sg.GROUPS["synthetic"]))
    root: str = option("data/synthetic", "the synthetic world (train-rle.csv and the images)")
    ckpt: str = option("", "train.py checkpoint for the encoder; empty: a random encoder (--scratch)")
    steps: int = option(600, "training iterations per variant", minimum=1)
    warmup_steps: int = option(10, "linear warm-up iterations", minimum=0)
    interval: int = option(100, "iterations between measurements", minimum=1)
    seed: int = option(0, "seed of the head, the data order and the random encoder", minimum=0)
    out_dir: str = option("runs/segment-diagnosis", "where diagnosis.json goes")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")


def probabilities(model, loader, device, precision) -> tuple[np.ndarray, list[np.ndarray]]:
    """(overlap counts (N, 3), [(foreground probabilities (S, S), truth (S, S))]) of the images of `loader`."""
    model.eval()
    counts, maps = [], []
    with torch.no_grad():
        for images, masks in loader:
            with autocast(device, precision):
                logits, _ = model(images.to(device))
            p = torch.softmax(logits.float(), dim=1)[:, 1].cpu()  # (B, S, S)
            counts.append(sg.overlap_counts(p > 0.5, masks == 1))  # argmax of two classes = p > 1/2
            maps += list(zip(p.numpy(), (masks == 1).numpy()))
    model.train()
    return np.concatenate(counts), maps


def measure(model, probes: dict, device, precision) -> dict:
    """The row of one measurement: training positives' Dice and probabilities, negatives' p, validation Dice."""
    counts, maps = probabilities(model, probes["positives"], device, precision)
    inside = np.mean([p[t].mean() for p, t in maps])
    outside = np.mean([p[~t].mean() for p, t in maps])
    _, negative_maps = probabilities(model, probes["negatives"], device, precision)
    val_counts, _ = probabilities(model, probes["val"], device, precision)
    val = dice_scores(val_counts)
    return dict(train_positive_dice=dice_scores(counts)["positive_dice"], p_inside=float(inside),
                p_outside=float(outside), p_negative=float(np.mean([p.mean() for p, _ in negative_maps])),
                val_pooled_dice=val["pooled_dice"], val_positive_dice=val["positive_dice"],
                val_med_dice=val["med_dice"])


def run_variant(name: str, cfg: DiagnosisConfig, device) -> list[dict]:
    overrides = dict(VARIANTS[name])
    setting = sg.SegmentConfig(recipe=cfg.recipe, root=cfg.root, ckpt=cfg.ckpt or None, scratch=not cfg.ckpt,
                               steps=cfg.steps, warmup_steps=min(cfg.warmup_steps, cfg.steps),
                               eval_interval=cfg.interval, seed=cfg.seed, device=cfg.device, **overrides)
    setting = sg.resolve(setting)[0]
    setting = dataclasses.replace(setting, precision=resolve_precision(setting.precision, device))
    init = encoders_to_compare(setting)[0]
    data = sg.load_data(setting)
    masks = {}
    for split in ("train", "val"):
        sg.decode_masks(data[split], setting.img_size, masks)
    in_chans = init["cfg"].in_chans

    def fixed(items):
        return sg.loader(sg.SegmentationDataset(items[:64], setting.img_size, in_chans, masks), setting, device)
    probes = dict(positives=fixed([i for i in data["train"] if i.rle]),
                  negatives=fixed([i for i in data["train"] if not i.rle]),
                  val=sg.loader(sg.SegmentationDataset(data["val"], setting.img_size, in_chans, masks), setting,
                                device))
    model = sg.build_segmenter(init, setting, device)
    train_set = sg.SegmentationDataset(data["train"], setting.img_size, in_chans, masks, flip=True)
    batches = iter(sg.loader(train_set, setting, device, sg.training_sampler(data["train"], setting)))
    rows, began = [], time.time()

    def validate():  # fit calls it at step 0, every cfg.interval steps and at the last
        rows.append(dict(step=min(len(rows) * cfg.interval, cfg.steps), **measure(model, probes, device,
                                                                                   setting.precision)))
        return rows[-1][f"val_{setting.select_by}"]
    history = sg.fit(model, batches, setting, validate, device, name)
    for row in rows[1:]:
        row["loss"] = float(np.mean(history["losses"][max(0, row["step"] - 10):row["step"]]))  # the last 10 steps
    print(f"\n{name} ({', '.join(f'{k}={v}' for k, v in overrides.items())}; {init['label']}, "
          f"{time.time() - began:.0f} s; best step by val {setting.select_by}: {history['best_step']})")
    print(table(rows))
    return rows


COLUMNS = ("step", "loss", "train_positive_dice", "p_inside", "p_outside", "p_negative", "val_pooled_dice",
           "val_positive_dice", "val_med_dice")


def table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{c:>19}" if k else f"{c:>5}" for k, c in enumerate(COLUMNS))]
    for row in rows:
        lines.append("  ".join(f"{row[c]:>5d}" if c == "step" else f"{row.get(c, float('nan')):>19.3f}"
                               for c in COLUMNS))
    return "\n".join(lines)


def main(argv=None) -> int:
    def body(cfg: DiagnosisConfig) -> None:
        names = [name.strip() for name in cfg.variants.split(",") if name.strip()]
        unknown = [name for name in names if name not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        device = pick_device(cfg.device)
        results = {}
        for name in names:
            results[name] = dict(flags=VARIANTS[name], rows=run_variant(name, cfg, device))
            write_json(dict(config=dataclasses.asdict(cfg), variants=results), Path(cfg.out_dir) / "diagnosis.json")
    return run_script(DiagnosisConfig, body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
