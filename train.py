"""MaCo pretraining, end to end.

    python train.py                                   # synthetic data (generated if missing), `tiny`, CPU minutes
    python train.py --data mimic --root /data/mimic-cxr-jpg --init mae_pretrain_vit_base.pth
    python train.py --data mimic --root ... --init maco.pth --tokenizer mimic_wordpiece.json   # from the released MaCo
    torchrun --nproc_per_node=4 train.py --data mimic --root ...     # the paper's 4-GPU run

Each --data has a recipe (`RECIPES`) that fills every setting left unset. The paper's (docs/method.md §7.1):
`base`, AdamW betas (0.9, 0.95), lr 2.5e-4, weight decay 0.05, 2 warm-up epochs then cosine, mask ratio 0.5,
448 -> 224 super-resolution target, 512 pairs per GPU on 4 GPUs (a contrastive batch of 2048), 51 epochs.
Every model setting is a flag too (`--img-size`, `--mask-ratio`, ...: `python train.py --help`).

Reproducibility: the data order is a function of (seed, epoch), each item's caption and augmentation of
(seed, epoch, index), and the masks and dropout of each optimizer step of (seed, rank, step): the random state
is re-seeded every step. So a checkpoint's step (with the seed in its config) *is* its RNG state, and a
resumed run computes exactly the losses the uninterrupted run would have.
"""

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from data import (
    CAPTION_SOURCES,
    Collate,
    MimicCXR,
    OpenI,
    build_cache,
    cache_is_complete,
    caption_reports,
    training_workers,
)
from maco import PRESETS, MaCo, MaCoConfig, load
from util.checkpoint import append_line, check_writable, read_checkpoint, read_log, save_checkpoint, write_atomic
from util.cli import as_flags, check_options, given_flags, option, overrides, run_script
from util.devices import PRECISIONS, autocast, describe_precision, resolve_precision, setup_distributed
from util.progress import Progress, lines_every, progress_interval_option
from util.released import read_weights
from util.run_guard import OutDirLock, StopSignals, ignore_stop_signals
from util.tokenizer import load_tokenizer, train_tokenizer

RECIPES = {
    "synthetic": dict(root="data/synthetic", preset="tiny", epochs=8, batch_size=32, lr=1e-3, warmup_epochs=1),
    "mimic": dict(root="", preset="base", epochs=51, batch_size=512, lr=2.5e-4, warmup_epochs=2),
    "openi": dict(root="", preset="base", epochs=51, batch_size=512, lr=2.5e-4, warmup_epochs=2),
}
MAX_EMPTY_STEPS = 10  # consecutive steps without one readable image: the data is broken, stop
RESUME_KEYS = ("model", "model_config", "train_config", "tokenizer", "optimizer", "step")
# settings a resumed run takes from the command line; the intervals and the precision only if given (and printed);
# all others come from the checkpoint
SESSION_FIELDS = ("resume", "out_dir", "overwrite", "device", "num_workers", "stop_after_steps", "compile", "eval",
                  "progress_interval")
OVERRIDABLE_FIELDS = ("log_interval", "ckpt_interval", "precision")


@dataclass
class TrainConfig:
    data: str = option("synthetic", "dataset and its recipe", choices=tuple(RECIPES))
    root: str = option(None, "dataset folder (synthetic: data/synthetic, generated if missing)")
    report_source: str = option("txt", "mimic reports: 'txt' (files/pXX/pXXXXXXXX/sXXXXXXXX.txt under --root) or the "
                                       "path of mimic_cxr_sectioned.csv")
    captions: str = option("report", "the sentences captions are drawn from: 'report' (findings + impression), "
                                     "'impression' (that section only) or 'positive' (findings + impression without "
                                     "the sentences that hold a negation cue; docs/alignment.md)",
                           choices=CAPTION_SOURCES)
    views_csv: str = option("", "openi: torchxrayvision's nlmcxr_tsne_pa.csv.gz (imageid,tsne-view), to pretrain on PA "
                                "images only as the paper does ('' = every image, laterals included)")
    cache: str = option("", "image cache folder from `python data.py cache` ('' = <root>/cache-<size> if present)")
    preset: str = option(None, "model preset (recipe: tiny for synthetic, base otherwise)", choices=tuple(PRESETS))
    tokenizer: str = option("", "tokenizers JSON file ('' = train WordPiece on the training reports)")
    init: str = option("", "weights to start from, with a fresh optimizer and schedule: MAE's ImageNet checkpoint "
                           "(mae_pretrain_vit_base.pth) for the image encoder, the released MaCo weights (maco.pth, "
                           "with --tokenizer mimic_wordpiece.json) or a train.py checkpoint (a warm start with its "
                           "tokenizer, e.g. from tools.warm_start) for the whole model")
    resume: str = option("", "checkpoint to continue from; it keeps its settings except "
                         + ", ".join(SESSION_FIELDS[1:] + OVERRIDABLE_FIELDS) + ". With another --out-dir the run "
                         "continues there as a branch; the source is never written")
    out_dir: str = option("runs/maco", "where the checkpoint, log and plots go")
    overwrite: bool = option(False, "start afresh in an --out-dir that already holds a run (its files are replaced)")
    epochs: int = option(None, "epochs (recipe: synthetic 8, mimic/openi 51 as in the paper)", minimum=1)
    batch_size: int = option(None, "pairs per process and micro-step (recipe: 32 tiny; 512 per GPU in the paper, x 4 "
                                   "GPUs = 2048)", minimum=1)
    accum_steps: int = option(1, "micro-steps per optimizer step. Enlarges the optimizer batch, NOT the contrastive "
                                 "batch: negatives stay the batch of one micro-step (x processes)", minimum=1)
    lr: float = option(None, "peak learning rate (recipe: 1e-3 tiny, 2.5e-4 paper)", above=0)
    weight_decay: float = option(0.05, "AdamW weight decay", minimum=0)
    beta1: float = option(0.9, "AdamW beta1", minimum=0, below=1)
    beta2: float = option(0.95, "AdamW beta2 (the paper's 0.95)", minimum=0, below=1)
    warmup_epochs: float = option(None, "linear warm-up epochs before the cosine (recipe: 1 synthetic, 2 paper)",
                                  minimum=0)
    synthetic_studies: int = option(6000, "studies to generate when the synthetic data is missing", minimum=10)
    seed: int = option(0, "random seed", minimum=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = option(False, "torch.compile the model")
    precision: str = option("auto", "bf16 autocast or fp32 (auto: bf16 on GPUs and CPUs with native bf16, see "
                                    "docs/speed.md; a resumed run keeps its checkpoint's unless given)",
                            choices=PRECISIONS)
    num_workers: int = option(None, "DataLoader worker processes (default: 0 when every image is cached, else 2)",
                              minimum=0)
    log_interval: int = option(10, "optimizer steps between log lines (and host syncs)", minimum=1)
    ckpt_interval: int = option(200, "optimizer steps between checkpoints (one is always written at the end)",
                                minimum=1)
    stop_after_steps: int = option(0, "end early after this many optimizer steps, as if killed (0 = run the schedule)",
                                   minimum=0)
    eval: bool = option(True, "synthetic data: evaluate zero-shot and grounding on the test split at the end")
    progress_interval: float = progress_interval_option()
    model: dict = overrides(MaCoConfig, PRESETS, "model settings (each defaults to the preset's value)")

    def __post_init__(self):
        check_options(self)
        unknown = set(self.model) - {spec.name for spec in dataclasses.fields(MaCoConfig)}
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}")
        try:  # the model settings given, on the preset they will change
            MaCoConfig.preset(self.preset or RECIPES[self.data]["preset"], **self.model)
        except ValueError as error:
            raise ValueError(as_flags(error, MaCoConfig)) from None
        if self.views_csv and self.data != "openi":
            raise ValueError(f"--views-csv names the views of Open-i images; --data {self.data} does not use it")


class TrainingError(RuntimeError):
    pass


@dataclass
class Run:
    """Everything a training loop needs, made by `setup`."""
    cfg: TrainConfig
    model_cfg: MaCoConfig
    rank: int
    world: int
    device: torch.device
    dataset: torch.utils.data.Dataset
    tokenizer: Tokenizer
    model: MaCo
    train_model: torch.nn.Module  # the model as trained: compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    start_step: int
    out_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stop_step(self) -> int:
        return min(self.total_steps, self.cfg.stop_after_steps or self.total_steps)


# ----------------------------------------------------------------------------------------------------------
# Set-up

def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill unset settings from the recipe of cfg.data."""
    filled = {k: v for k, v in RECIPES[cfg.data].items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **filled)
    if not cfg.root:
        raise ValueError(f"--data {cfg.data} needs --root, the dataset folder")
    return cfg


def resume_config(cfg: TrainConfig, checkpoint: dict, given: set[str]) -> TrainConfig:
    """The checkpoint's settings with this session's (SESSION_FIELDS) from the command line. A setting given on
    the command line that contradicts the checkpoint is an error, never silently ignored."""
    unknown = set(checkpoint["train_config"]) - {spec.name for spec in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"--resume {cfg.resume}: written by another version of train.py (settings {sorted(unknown)})")
    saved = TrainConfig(**checkpoint["train_config"])
    for name in sorted(given - set(SESSION_FIELDS + OVERRIDABLE_FIELDS)):
        if name == "model":
            stored = checkpoint["model_config"]
            clashes = {k: v for k, v in cfg.model.items() if stored.get(k) != v}
        else:
            clashes = {name: getattr(cfg, name)} if getattr(cfg, name) != getattr(saved, name) else {}
        for key, value in clashes.items():
            held = checkpoint["model_config"].get(key) if name == "model" else getattr(saved, key)
            raise ValueError(f"--resume {cfg.resume}: --{key.replace('_', '-')} {value} contradicts the checkpoint's "
                             f"{held}; a resumed run keeps its settings (start a new run to change them)")
    changed = {k: getattr(cfg, k) for k in OVERRIDABLE_FIELDS if k in given and getattr(cfg, k) != getattr(saved, k)}
    if changed:
        print("resume: " + ", ".join(f"--{k.replace('_', '-')} {v} (was {getattr(saved, k)})"
                                     for k, v in changed.items()))
    return dataclasses.replace(saved, **{k: getattr(cfg, k) for k in SESSION_FIELDS}, **changed)


def prepare_out_dir(cfg: TrainConfig, is_main: bool, resume_step: int | None) -> Path:
    """Check --out-dir before any work: writable, and never another run's files overwritten by accident. A
    resume into another folder is a branch: the source run's log up to its step is copied there."""
    out_dir = Path(cfg.out_dir)
    if not is_main:
        return out_dir
    check_writable(out_dir, "--out-dir")
    existing = out_dir / "checkpoint.pt"
    resuming_here = cfg.resume and existing.exists() and existing.resolve() == Path(cfg.resume).resolve()
    if not resuming_here and not cfg.overwrite and existing.exists():
        raise ValueError(f"--out-dir {out_dir} already holds a run; continue it with --resume {existing}, "
                         f"or choose another --out-dir, or pass --overwrite to replace it")
    if not resuming_here and not cfg.overwrite and (out_dir / "log.jsonl").exists():
        raise ValueError(f"--out-dir {out_dir} holds the log of a run stopped before its first checkpoint; start "
                         f"again with --overwrite, or choose another --out-dir")
    if not resuming_here:  # a fresh run (--overwrite) or a branch starts its own files
        for name in ("checkpoint.pt", "log.jsonl", "loss.png"):
            (out_dir / name).unlink(missing_ok=True)
    if cfg.resume:
        write_atomic(out_dir / "log.jsonl", lambda temp: Path(temp).write_text(log_until(cfg.resume, resume_step)))
    return out_dir


def log_until(checkpoint_path: str, step: int) -> str:
    """The log of the run so far, up to the checkpoint's step: the lines a killed run wrote after its last
    checkpoint are dropped (its steps run again), so a resumed log equals an uninterrupted one."""
    source_log = Path(checkpoint_path).parent / "log.jsonl"
    records = read_log(source_log) if source_log.exists() else []
    kept = [record for record in records if record["step"] <= step]
    if len(kept) < len(records):
        print(f"{source_log}: dropped {len(records) - len(kept)} line(s) after step {step}, the checkpoint's")
    return "".join(json.dumps(record) + "\n" for record in kept)


def build_dataset(cfg: TrainConfig, model_cfg: MaCoConfig, is_main: bool):
    size = model_cfg.input_size
    root = Path(cfg.root)
    if cfg.data == "synthetic" and not (root / "mimic-cxr-2.0.0-metadata.csv.gz").exists():
        if is_main:
            from world.synthetic import generate
            print(f"no synthetic data at {root}: generating {cfg.synthetic_studies} studies (seed {cfg.seed})")
            generate(root, cfg.synthetic_studies, cfg.seed)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    cache = Path(cfg.cache) if cfg.cache else root / f"cache-{size}"
    if cfg.data == "synthetic" and not cfg.cache and not cache_is_complete(cache):
        if is_main:  # the synthetic world is small: its images are resized once, and training never decodes a JPEG
            build_cache(MimicCXR(root, split=None, image_size=size), cache, workers=2)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    cache = cache if (cfg.cache or cache.exists()) else None
    sections = ("impression",) if cfg.captions == "impression" else ("findings", "impression")
    common = dict(image_size=size, in_chans=model_cfg.in_chans, augment=True, cache=cache, seed=cfg.seed,
                  sections=sections)
    if cfg.data == "openi":
        dataset = OpenI(root, views_csv=cfg.views_csv or None, **common)
    else:
        dataset = MimicCXR(root, split="train", report_source=cfg.report_source, **common)
    dataset.reports = caption_reports(dataset.reports, cfg.captions)
    return dataset


def init_tokenizer(path: str) -> Tokenizer | None:
    """The tokenizer of a train.py checkpoint given as --init (the model's word ids are its), else None: MAE's and
    the released weights carry none."""
    weights = read_weights(path, "--init")
    return Tokenizer.from_str(weights["tokenizer"]) if "model_config" in weights else None


def setup(cfg: TrainConfig, given: set[str]) -> Run:
    """Configuration (recipe, resume), device and processes, output folder, data, tokenizer, model, optimizer."""
    checkpoint = read_checkpoint(cfg.resume, "--resume", RESUME_KEYS) if cfg.resume else None
    if checkpoint:
        cfg = resume_config(cfg, checkpoint, given)
    cfg = resolve(cfg)
    if cfg.init and not checkpoint and not Path(cfg.init).is_file():
        raise FileNotFoundError(f"--init {cfg.init}: no such file")
    model_cfg = (MaCoConfig(**checkpoint["model_config"]) if checkpoint
                 else MaCoConfig.preset(cfg.preset, **cfg.model))
    rank, world, device = setup_distributed(cfg.device)
    precision_note = describe_precision(cfg.precision, device)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))  # what the checkpoint records
    out_dir = prepare_out_dir(cfg, rank == 0, checkpoint["step"] if checkpoint else None)
    dataset = build_dataset(cfg, model_cfg, rank == 0)
    if cfg.num_workers is None:
        cfg = dataclasses.replace(cfg, num_workers=training_workers(dataset))
    if len(dataset) == 0:
        raise FileNotFoundError("no image of this selection has a report to pair it with (the summary above counts "
                                "what was skipped); check --root, the report files or --report-source "
                                "(docs/datasets.md)")
    if checkpoint:
        tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
    elif cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif cfg.init and (carried := init_tokenizer(cfg.init)):
        tokenizer = carried  # a warm start from a train.py checkpoint keeps its word ids
    else:
        tokenizer = train_tokenizer(dataset.report_texts(), vocab_size=model_cfg.vocab_size)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.get_vocab_size())

    iterations_per_epoch = len(dataset) // world // cfg.batch_size
    steps_per_epoch = iterations_per_epoch // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(dataset)} pairs, fewer than one optimizer step needs "
                         f"({cfg.batch_size} x {cfg.accum_steps} micro-steps x {world} processes); lower --batch-size")

    torch.manual_seed(cfg.seed)
    model = MaCo(model_cfg).to(device)
    if cfg.init and not checkpoint:  # the whole model from the released weights, or the image encoder from MAE's
        load(cfg.init, cfg.tokenizer or None, into=model, verbose=rank == 0)
        if rank == 0:
            print(f"initialised from --init {cfg.init}")
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type)
    start_step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step = checkpoint["step"]
    train_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device] if device.type == "cuda" else None)
    run = Run(cfg, model_cfg, rank, world, device, dataset, tokenizer, model, train_model, optimizer,
              steps_per_epoch, cfg.epochs * steps_per_epoch, start_step, out_dir)
    if run.is_main:
        what = f"resumed at step {start_step} from {cfg.resume}," if checkpoint else f"training {cfg.preset}"
        print(f"{what} MaCo on {len(dataset)} {cfg.data} pairs, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
              f"batch {cfg.batch_size} x {world} process(es), {cfg.num_workers} loader workers, device {device}, "
              f"{precision_note}"
              f"; writing to {out_dir}")
    return run


# ----------------------------------------------------------------------------------------------------------
# Schedule, data order, one optimizer step

def pretrain_lr(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0, then a half-cycle cosine to 0 at the last epoch (docs/method.md §7.1), per step."""
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def epoch_indices(n: int, per_rank_epoch: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's items of one epoch: a permutation drawn from (seed, epoch), dealt out in turn to the ranks."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[rank::world][:per_rank_epoch].tolist()


def step_batches(run: Run):
    """Yield (step, the accum_steps micro-batches of that optimizer step), from run.start_step to run.stop_step.
    A loader is built per epoch, starting at the step's offset, so a resumed run sees exactly the same batches."""
    cfg, step = run.cfg, run.start_step
    per_step = cfg.accum_steps * cfg.batch_size
    while step < run.stop_step:
        epoch, offset = divmod(step, run.steps_per_epoch)
        run.dataset.set_epoch(epoch)
        indices = epoch_indices(len(run.dataset), len(run.dataset) // run.world, cfg.seed, epoch, run.rank, run.world)
        loader = DataLoader(run.dataset, batch_size=cfg.batch_size, collate_fn=Collate(run.tokenizer, run.model_cfg.max_len),
                            sampler=indices[offset * per_step: run.steps_per_epoch * per_step],
                            num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda", drop_last=True,
                            worker_init_fn=ignore_stop_signals)
        batches = iter(loader)
        for step in range(step, min(run.stop_step, (epoch + 1) * run.steps_per_epoch)):
            yield step, [next(batches) for _ in range(cfg.accum_steps)]
        step += 1


def train_step(run: Run, step: int, batches: list[dict]) -> dict:
    """One optimizer step over `batches` (accum_steps micro-batches). Images that could not be read were dropped
    by Collate and are counted in the result; a micro-batch with none left trains nothing, and a step whose
    micro-batches are all empty only advances the schedule. Returns the last forward's outputs plus counts."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed * 1_000_003 + run.rank * 10_007 + step)  # masks and dropout of this step
    for group in run.optimizer.param_groups:
        group["lr"] = pretrain_lr(step, run.steps_per_epoch, cfg)
    out, images_trained, skipped = None, 0, sum(batch["skipped"] for batch in batches)
    if skipped and run.world > 1:  # all_gather needs equal batches on every process
        raise TrainingError(f"{skipped} unreadable image(s) in a {run.world}-process run; find them with "
                            f"`python data.py cache` (it records unreadable images) and remove them")
    for batch in batches:
        if batch["images"] is None:
            continue
        images = batch["images"].to(device, non_blocking=True)
        with autocast(device, cfg.precision):
            out = run.train_model(images, batch["input_ids"].to(device, non_blocking=True),
                                  batch["attention_mask"].to(device, non_blocking=True))
        (out["loss"] / cfg.accum_steps).backward()
        images_trained += images.shape[0] * run.world
    if out is not None:
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return {"out": out, "images": images_trained, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints, logs, the end of the run

def checkpoint_state(run: Run, step: int) -> dict:
    return {"model": run.model.state_dict(), "model_config": dataclasses.asdict(run.model_cfg),
            "train_config": dataclasses.asdict(run.cfg), "tokenizer": run.tokenizer.to_str(),
            "optimizer": run.optimizer.state_dict(), "step": step, "steps_per_epoch": run.steps_per_epoch,
            "lr": pretrain_lr(step, run.steps_per_epoch, run.cfg)}


def log_record(run: Run, step: int, out: dict, images: int, seconds: float, skipped: int) -> dict:
    """One line of log.jsonl: the losses of the step's last forward and the throughput since the last line."""
    weights = out["correlation_weights"]
    return {"step": step, "epoch": round(step / run.steps_per_epoch, 3), "lr": run.optimizer.param_groups[0]["lr"],
            **{k: out[k].item() for k in ("loss", "loss_rec", "loss_con", "logit_scale")},
            "correlation_weight_mean": weights.mean().item(), "correlation_weight_std": weights.std().item(),
            "images_per_s": images / max(seconds, 1e-9), "skipped": skipped}


def plot_losses(log_path: Path, out_path: Path) -> None:
    """The loss curves as a PNG. A bare Figure, not pyplot: the caller's (a notebook's) backend stays as it was."""
    from matplotlib.figure import Figure
    rows = read_log(log_path)
    figure = Figure(figsize=(13, 3.5))
    for axis, key in zip(figure.subplots(1, 3), ["loss", "loss_rec", "loss_con"]):
        axis.plot([r["step"] for r in rows], [r[key] for r in rows])
        axis.set_title(key)
        axis.set_xlabel("optimizer step")
    figure.tight_layout()
    write_atomic(out_path, lambda temp: figure.savefig(temp, format="png", dpi=100))


def evaluate_at_end(run: Run) -> dict:
    """Zero-shot classification and grounding on the synthetic test split, written to <out_dir>/eval."""
    from eval_zeroshot import EvalConfig, format_results, run_evaluation
    eval_cfg = EvalConfig(ckpt=str(run.out_dir / "checkpoint.pt"), data="synthetic", root=run.cfg.root,
                          out=str(run.out_dir / "eval"), device=str(run.device), precision=run.cfg.precision,
                          progress_interval=run.cfg.progress_interval)
    results = run_evaluation(eval_cfg, run.model.eval(), run.tokenizer)
    print(format_results(results))
    return results


# ----------------------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig, given: set[str] | None = None) -> dict:
    """Train as `cfg` says; returns the paths written, the last log record, the images skipped, and the
    evaluation (synthetic data). `given`: the settings named on the command line (for --resume checks);
    by default those that differ from TrainConfig's defaults. Holds --out-dir's lock throughout; a SIGTERM or
    Ctrl-C during the steps writes a checkpoint and exits (SystemExit 143 or 130)."""
    with OutDirLock(cfg.out_dir, "--out-dir", enabled=int(os.environ.get("RANK", "0")) == 0), \
            lines_every(cfg.progress_interval):
        run = setup(cfg, given if given is not None else given_flags(cfg))
        with StopSignals() as stop:
            result = train_steps(run, stop)
        return finish(run, result)


def train_steps(run: Run, stop: StopSignals) -> dict:
    """The optimizer steps, with their log lines and checkpoints; returns the step reached, the last log record
    and the images skipped."""
    ckpt_path, log_path = run.out_dir / "checkpoint.pt", run.out_dir / "log.jsonl"
    bad_step = torch.full((), -1, device=run.device)  # first step with a non-finite loss, checked at log time only
    done, last, last_out, skipped, empty_steps, window_images, window_start = run.start_step, {}, None, 0, 0, 0, time.time()
    progress = Progress(run.total_steps, "train", initial=run.start_step, enabled=run.is_main)
    run.model.train()
    for step, batches in step_batches(run):
        result = train_step(run, step, batches)
        skipped, window_images = skipped + result["skipped"], window_images + result["images"]
        empty_steps = 0 if result["images"] else empty_steps + 1
        if empty_steps == MAX_EMPTY_STEPS:
            raise TrainingError(f"no image could be read in {empty_steps} consecutive steps ({skipped} skipped so "
                                f"far); check the image files under {run.cfg.root}")
        if result["out"] is not None:
            loss = result["out"]["loss"].detach()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
            last_out = result["out"]
        done = step + 1
        at_log = done % run.cfg.log_interval == 0 or done % run.cfg.ckpt_interval == 0 or done == run.stop_step
        stopping = stop.should_stop(run.world, run.device, at_log)
        shown = {}  # the loss and throughput beside the progress, from each log line
        if at_log and last_out is not None:  # (nothing to log before the first readable batch)
            if bad_step.item() >= 0:  # the one host sync of the step, at logging time
                kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
                raise TrainingError(f"the loss became non-finite at step {bad_step.item()}; stopped at step {done}; {kept}")
            last = log_record(run, done, last_out, window_images, time.time() - window_start, skipped)
            window_images, window_start = 0, time.time()
            if run.is_main:
                append_line(log_path, json.dumps(last))
            shown = dict(loss=f"{last['loss']:.3f}", img_s=f"{last['images_per_s']:.0f}")
        progress.update(1, **shown)
        if run.is_main and (done % run.cfg.ckpt_interval == 0 or done == run.stop_step or stopping):
            save_checkpoint(ckpt_path, checkpoint_state(run, done))
        if stopping:
            progress.close()
            if run.is_main:
                print(f"stopped at step {done}; continue with: python train.py --resume {ckpt_path}")
            raise SystemExit(stop.exit_code)
    progress.close()
    return {"step": done, "last": last, "skipped": skipped}


def finish(run: Run, steps: dict) -> dict:
    """The loss curve, and the evaluation at the end of a complete synthetic run."""
    ckpt_path, log_path = run.out_dir / "checkpoint.pt", run.out_dir / "log.jsonl"
    if run.is_main and log_path.exists():
        plot_losses(log_path, run.out_dir / "loss.png")
    result = {"checkpoint": str(ckpt_path), "log": str(log_path), "plot": str(run.out_dir / "loss.png"), **steps}
    if run.is_main and run.cfg.eval and run.cfg.data == "synthetic" and result["step"] == run.total_steps:
        result["eval"] = evaluate_at_end(run)
    if run.world > 1:
        torch.distributed.destroy_process_group()
    return result


def print_summary(result: dict, seconds: float) -> None:
    if result["last"]:
        last = result["last"]
        print(f"step {result['step']}: loss {last['loss']:.4f} (rec {last['loss_rec']:.4f}, con {last['loss_con']:.4f}); "
              f"{seconds:.0f} s; {result['skipped']} unreadable image(s) skipped")
    print(f"checkpoint: {result['checkpoint']}\nlog: {result['log']}\nloss curve: {result['plot']}")
    if "eval" in result:
        print(f"evaluation: {Path(result['checkpoint']).parent / 'eval'}")


def main(argv=None) -> int:
    argv, start = (sys.argv[1:] if argv is None else argv), time.time()
    return run_script(TrainConfig, lambda cfg: print_summary(train(cfg, given_flags(cfg, argv)), time.time() - start),
                      argv, __doc__, errors=(FileNotFoundError, ValueError, TrainingError))


if __name__ == "__main__":
    sys.exit(main())
