"""MaCo pretraining, end to end.

    python train.py                                   # synthetic data (generated if missing), `tiny`, CPU minutes
    python train.py --data mimic --root /data/mimic-cxr-jpg --init mae_pretrain_vit_base.pth
    torchrun --nproc_per_node=4 train.py --data mimic --root ...     # the paper's 4-GPU run

Each --data has a recipe (`RECIPES`) that fills every setting left unset. The paper's (spec section 7.1):
`base`, AdamW betas (0.9, 0.95), lr 2.5e-4, weight decay 0.05, 2 warm-up epochs then cosine, mask ratio 0.5,
448 -> 224 super-resolution target, 512 pairs per GPU on 4 GPUs (a contrastive batch of 2048), 51 epochs.

Reproducibility: the data order is a function of (seed, epoch), each item's caption and augmentation of
(seed, epoch, index), and the masks and dropout of each optimizer step of (seed, rank, step): the random state
is re-seeded every step. So a checkpoint's step (with the seed in its config) *is* its RNG state, and a
resumed run computes exactly the losses the uninterrupted run would have.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cli import parse_config
from data import Collate, MimicCXR, OpenI, write_atomic
from maco import MaCo, MaCoConfig, load_mae_encoder, read_checkpoint
from text_encoder import load_tokenizer, train_tokenizer

RECIPES = {
    "synthetic": dict(root="data/synthetic", preset="tiny", epochs=8, batch_size=32, lr=1e-3, warmup_epochs=1),
    "mimic": dict(root="", preset="base", epochs=51, batch_size=512, lr=2.5e-4, warmup_epochs=2),
    "openi": dict(root="", preset="base", epochs=51, batch_size=512, lr=2.5e-4, warmup_epochs=2),
}
RESUME_KEYS = ("model", "model_config", "train_config", "tokenizer", "optimizer", "step")
# settings a resumed run takes from the command line; everything else comes from the checkpoint
SESSION_FIELDS = ("resume", "device", "num_workers", "stop_after_steps", "compile", "eval")


@dataclass
class TrainConfig:
    data: str = field(default="synthetic", metadata={"help": "synthetic | mimic | openi"})
    root: str = field(default=None, metadata={"help": "dataset folder (synthetic: data/synthetic, generated if missing)"})
    report_source: str = field(default="txt", metadata={
        "help": "mimic reports: 'txt' (files/pXX/pXXXXXXXX/sXXXXXXXX.txt under --root) or the path of mimic_cxr_sectioned.csv"})
    cache: str = field(default="", metadata={"help": "image cache folder from `python data.py cache` ('' = <root>/cache-<size> if present)"})
    preset: str = field(default=None, metadata={"help": "model preset tiny | base (recipe: tiny for synthetic, base otherwise)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizers JSON file ('' = train WordPiece on the training reports)"})
    init: str = field(default="", metadata={"help": "MAE ImageNet checkpoint (mae_pretrain_vit_base.pth) for the image encoder"})
    resume: str = field(default="", metadata={"help": "checkpoint to continue from; its settings win except " + ", ".join(SESSION_FIELDS)})
    out_dir: str = field(default="runs/maco", metadata={"help": "where the checkpoint, log and plots go"})
    epochs: int = field(default=None, metadata={"help": "epochs (recipe: synthetic 8, mimic/openi 51 as in the paper)"})
    batch_size: int = field(default=None, metadata={
        "help": "pairs per process and micro-step (recipe: 32 tiny; 512 per GPU in the paper, x 4 GPUs = 2048)"})
    accum_steps: int = field(default=1, metadata={
        "help": "micro-steps per optimizer step. Enlarges the optimizer batch, NOT the contrastive batch: "
                "negatives stay the batch of one micro-step (x processes)"})
    lr: float = field(default=None, metadata={"help": "peak learning rate (recipe: 1e-3 tiny, 2.5e-4 paper)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_epochs: float = field(default=None, metadata={"help": "linear warm-up epochs before the cosine (recipe: 1 synthetic, 2 paper)"})
    mask_ratio: float = field(default=None, metadata={"help": "fraction of patches masked (preset: 0.5)"})
    lam: float = field(default=None, metadata={"help": "loss = lam * L_rec + (1 - lam) * L_con (preset: 0.5)"})
    super_resolution: bool = field(default=None, metadata={"help": "predict patches of a 2x input (preset: on)"})
    correlation_weighting: bool = field(default=None, metadata={"help": "correlation-weighted loss, else plain InfoNCE (preset: on)"})
    synthetic_studies: int = field(default=6000, metadata={"help": "studies to generate when the synthetic data is missing"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    log_interval: int = field(default=10, metadata={"help": "optimizer steps between log lines (and host syncs)"})
    ckpt_interval: int = field(default=200, metadata={"help": "optimizer steps between checkpoints (one is always written at the end)"})
    stop_after_steps: int = field(default=0, metadata={"help": "end early after this many optimizer steps, as if killed (0 = run the schedule)"})
    eval: bool = field(default=True, metadata={"help": "synthetic data: evaluate zero-shot and grounding on the test split at the end"})


class TrainingError(RuntimeError):
    pass


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill unset settings from the recipe of cfg.data."""
    if cfg.data not in RECIPES:
        raise ValueError(f"unknown --data {cfg.data!r}; choose one of {', '.join(RECIPES)}")
    filled = {k: v for k, v in RECIPES[cfg.data].items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **filled)
    if not cfg.root:
        raise ValueError(f"--data {cfg.data} needs --root, the dataset folder")
    return cfg


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0, then a half-cycle cosine to 0 at the last epoch (spec 7.1), per optimizer step."""
    epoch = step / steps_per_epoch
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def epoch_indices(n: int, per_rank_epoch: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's items of one epoch: a permutation drawn from (seed, epoch), dealt out in turn to the ranks."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[rank::world][:per_rank_epoch].tolist()


def build_dataset(cfg: TrainConfig, model_cfg: MaCoConfig, is_main: bool):
    size = model_cfg.input_size
    root = Path(cfg.root)
    if cfg.data == "synthetic" and not (root / "mimic-cxr-2.0.0-metadata.csv.gz").exists():
        if is_main:
            from synthetic import generate
            print(f"no synthetic data at {root}: generating {cfg.synthetic_studies} studies (seed {cfg.seed})")
            generate(root, cfg.synthetic_studies, cfg.seed)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    cache = Path(cfg.cache) if cfg.cache else root / f"cache-{size}"
    cache = cache if (cfg.cache or cache.exists()) else None
    common = dict(image_size=size, in_chans=model_cfg.in_chans, augment=True, cache=cache, seed=cfg.seed)
    if cfg.data == "openi":
        return OpenI(root, **common)
    return MimicCXR(root, split="train", report_source=cfg.report_source, **common)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write, then rename: a kill mid-write leaves the previous checkpoint intact."""
    write_atomic(path, lambda temp: torch.save(state, temp))


def trim_log(path: Path, last_step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be computed again)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        write_atomic(path, lambda temp: Path(temp).write_text("".join(line + "\n" for line in lines)))


def plot_losses(log_path: Path, out_path: Path) -> None:
    """The loss curves as a PNG. A bare Figure, not pyplot: the caller's (a notebook's) backend stays as it was."""
    from matplotlib.figure import Figure
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    figure = Figure(figsize=(13, 3.5))
    for axis, key in zip(figure.subplots(1, 3), ["loss", "loss_rec", "loss_con"]):
        axis.plot([r["step"] for r in rows], [r[key] for r in rows])
        axis.set_title(key)
        axis.set_xlabel("optimizer step")
    figure.tight_layout()
    write_atomic(out_path, lambda temp: figure.savefig(temp, format="png", dpi=100))


def setup_distributed(device_name: str):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" and world > 1 else device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def train(cfg: TrainConfig) -> dict:
    checkpoint = read_checkpoint(cfg.resume, "--resume", RESUME_KEYS) if cfg.resume else None
    if checkpoint is not None:  # the run's own settings, with this session's ones from the command line
        session = {k: getattr(cfg, k) for k in SESSION_FIELDS}
        cfg = dataclasses.replace(TrainConfig(**checkpoint["train_config"]), **session)
    cfg = resolve(cfg)
    rank, world, device = setup_distributed(cfg.device)
    is_main = rank == 0
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model_overrides = {k: getattr(cfg, k) for k in ("mask_ratio", "lam", "super_resolution", "correlation_weighting")
                       if getattr(cfg, k) is not None}
    model_cfg = (MaCoConfig(**checkpoint["model_config"]) if checkpoint
                 else MaCoConfig.preset(cfg.preset, **model_overrides))
    dataset = build_dataset(cfg, model_cfg, is_main)
    if checkpoint:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
    elif cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_tokenizer(dataset.report_texts(), vocab_size=model_cfg.vocab_size)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.get_vocab_size())

    per_rank_epoch = len(dataset) // world
    iterations_per_epoch = per_rank_epoch // cfg.batch_size
    steps_per_epoch = iterations_per_epoch // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(dataset)} pairs, fewer than one optimizer step needs "
                         f"({cfg.batch_size} x {cfg.accum_steps} micro-steps x {world} processes); lower --batch-size")
    total_steps = cfg.epochs * steps_per_epoch

    torch.manual_seed(cfg.seed)
    model = MaCo(model_cfg).to(device)
    if cfg.init and not checkpoint:
        report = load_mae_encoder(model, cfg.init)
        if is_main:
            print(report)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, device_type=device.type)
    start_step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_step = checkpoint["step"]
        if is_main:
            trim_log(out_dir / "log.jsonl", start_step)
            print(f"resumed from {cfg.resume} at step {start_step} of {total_steps}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[device] if device.type == "cuda" else None)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    train_cfg_dict = dataclasses.asdict(cfg)

    def write_checkpoint(step):
        if is_main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "model_config": dataclasses.asdict(model_cfg),
                                        "train_config": train_cfg_dict, "tokenizer": tokenizer.to_str(),
                                        "optimizer": optimizer.state_dict(), "step": step,
                                        "steps_per_epoch": steps_per_epoch, "lr": lr_at(step, steps_per_epoch, cfg)})

    if is_main:
        print(f"training {cfg.preset if not checkpoint else 'resumed'} MaCo on {len(dataset)} {cfg.data} pairs, "
              f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size} x {world} process(es), "
              f"device {device}{' (bf16)' if use_bf16 else ''}")
    collate = Collate(tokenizer, model_cfg.max_len)
    bad_step = torch.full((), -1, device=device)  # first step with a non-finite loss, checked at log time only
    step, skipped, last = start_step, 0, {}
    window_start, window_images = time.time(), 0
    progress = tqdm(total=total_steps, initial=start_step, disable=not is_main, dynamic_ncols=True)
    model.train()
    while step < total_steps and not (cfg.stop_after_steps and step >= cfg.stop_after_steps):
        epoch, offset = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        indices = epoch_indices(len(dataset), per_rank_epoch, cfg.seed, epoch, rank, world)
        indices = indices[offset * cfg.accum_steps * cfg.batch_size: steps_per_epoch * cfg.accum_steps * cfg.batch_size]
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=indices, collate_fn=collate,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda", drop_last=True)
        for micro_step, batch in enumerate(loader):
            if micro_step % cfg.accum_steps == 0:
                torch.manual_seed(cfg.seed * 1_000_003 + rank * 10_007 + step)  # masks and dropout of this step
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, steps_per_epoch, cfg)
            if batch is None:  # every image of the batch was unreadable
                continue
            skipped += batch["skipped"]
            if batch["skipped"] and world > 1:  # all_gather needs equal batches on every process
                raise TrainingError(f"{batch['skipped']} unreadable image(s) in a {world}-process run; find them with "
                                    f"`python data.py cache` (it records unreadable images) and remove them")
            images = batch["images"].to(device, non_blocking=True)
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            attention_mask = batch["attention_mask"].to(device, non_blocking=True)
            with autocast():
                out = train_model(images, input_ids, attention_mask)
            (out["loss"] / cfg.accum_steps).backward()
            window_images += images.shape[0] * world
            if (micro_step + 1) % cfg.accum_steps:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(out["loss"].detach()), step, bad_step)
            step += 1
            progress.update(1)
            at_end = step == total_steps or step == cfg.stop_after_steps
            if step % cfg.log_interval == 0 or step % cfg.ckpt_interval == 0 or at_end:
                if bad_step.item() >= 0:  # the one host sync of the step, at logging time
                    kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
                    raise TrainingError(f"the loss became non-finite at step {bad_step.item()}; stopped at step {step}; {kept}")
                elapsed = time.time() - window_start
                last = {"step": step, "epoch": round(step / steps_per_epoch, 3), "lr": optimizer.param_groups[0]["lr"],
                        **{k: out[k].item() for k in ("loss", "loss_rec", "loss_con", "logit_scale")},
                        "weight_mean": out["weights"].mean().item(), "weight_std": out["weights"].std().item(),
                        "images_per_s": window_images / max(elapsed, 1e-9), "skipped": skipped}
                window_start, window_images = time.time(), 0
                if is_main:
                    with open(log_path, "a") as log:
                        log.write(json.dumps(last) + "\n")
                    progress.set_postfix(loss=f"{last['loss']:.3f}", img_s=f"{last['images_per_s']:.0f}")
            if step % cfg.ckpt_interval == 0 or at_end:
                write_checkpoint(step)
            if at_end:
                break
    progress.close()
    if is_main and log_path.exists():
        plot_losses(log_path, out_dir / "loss.png")
    result = {"checkpoint": str(ckpt_path), "log": str(log_path), "plot": str(out_dir / "loss.png"),
              "step": step, "last": last, "skipped": skipped}
    if is_main and cfg.eval and cfg.data == "synthetic" and step == total_steps:
        from eval_zeroshot import EvalConfig, format_table, run_evaluation
        eval_cfg = EvalConfig(ckpt=str(ckpt_path), data="synthetic", root=cfg.root, out=str(out_dir / "eval"),
                              device=str(device))
        result["eval"] = run_evaluation(eval_cfg, model.eval(), tokenizer)
        print(format_table(result["eval"]))
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


def main(argv=None) -> int:
    cfg = parse_config(TrainConfig, argv, __doc__)
    start = time.time()
    try:
        result = train(cfg)
    except (FileNotFoundError, ValueError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "last" in result and result["last"]:
        print(f"step {result['step']}: loss {result['last']['loss']:.4f} (rec {result['last']['loss_rec']:.4f}, "
              f"con {result['last']['loss_con']:.4f}); {time.time() - start:.0f} s")
    print(f"checkpoint: {result['checkpoint']}\nlog: {result['log']}\nloss curve: {result['plot']}")
    if "eval" in result:
        print(f"evaluation: {Path(cfg.out_dir) / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
