"""Measure, don't guess: one MaCo training step side by side (fp32 against another precision, eager against
compiled), and the training data path.

    python -m tools.bench                                          # tiny, batch 32: fp32 against what auto picks
    python -m tools.bench --preset base --batch-size 8 --precision bf16     # fp32 against bf16 autocast
    python -m tools.bench --preset tiny --batch-size 32 --precision bf16 --compile     # and each compiled
    python -m tools.bench --preset base --batch-size 128 --device cuda --compile      # a GPU: bf16, fused AdamW, MFU
    python -m tools.bench --loader --root data/synthetic           # the data path of the default run
    python -m tools.bench --loop --root data/synthetic             # the default run's loop: batches against steps

Step: forward, backward and AdamW on random tensors of the preset's shapes (reports padded to --text-len tokens),
so nothing but the model is timed. The variants (fp32 and the --precision chosen; eager and, with --compile,
compiled) train one model on the same inputs, and their steps are interleaved (fp32, bf16, fp32, bf16, ...), so
that other jobs on the machine, or a clock that drifts, slow them alike; each variant's median step is printed,
with its ratio to eager fp32. The top lines say what the CPU (or GPU) offers and which kernel each attention call
gets. FLOPs are counted once with torch.utils.flop_counter; on a GPU whose bf16 peak is known, MFU is printed.

Loader (--loader): images/s of the DataLoader that train.py builds (same cache, same workers), and the cost per
image of each phase in one process: reading the pixels (a cache row, or a JPEG decoded and resized), the
augmentation, the caption, the normalisation, and the collation (tokenizing) per batch.

Loop (--loop): train.py's own loop (train.setup, step_batches, train_step) on the recipe of --root's synthetic world
with --preset, --batch-size, --precision and --num-workers: per step, the time spent getting the batch and the time
of the step itself, and their ratio, the run's rate over the step-alone rate (the issue's target: at least 0.95).
Both are measured in the same process, step after step, so a machine whose load varies affects them alike.
"""

import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from maco import PRESETS, MaCo, MaCoConfig
from util.cli import check_options, option, overrides, run_script
from util.devices import PRECISIONS, autocast, describe_precision, resolve_precision, setup_distributed

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks
SDPA_KERNELS = {0: "math (the slow path)", 1: "flash", 2: "memory-efficient", 3: "cuDNN", 4: "overrideable"}


@dataclass
class BenchConfig:
    preset: str = option("tiny", "model preset", choices=tuple(PRESETS))
    batch_size: int = option(32, "pairs per step", minimum=1)
    text_len: int = option(80, "report tokens per pair (padded length, at most the preset's max_len; the synthetic "
                               "world's batches of 32 pad to 55-100, median about 80: --loader prints it)", minimum=1)
    steps: int = option(10, "timed steps per variant", minimum=1)
    warmup: int = option(2, "untimed steps per variant first (compilation happens here)", minimum=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    precision: str = option("auto", "the precision measured against fp32 (auto: bf16 on GPUs and CPUs with native "
                                    "bf16, see docs/speed.md; else fp32 alone)", choices=PRECISIONS)
    compile: bool = option(False, "also measure each precision with torch.compile")
    loader: bool = option(False, "measure the training data path instead of the step")
    loop: bool = option(False, "measure train.py's loop instead: getting each batch against the step")
    root: str = option("data/synthetic", "--loader, --loop: dataset root (MIMIC-CXR-JPG layout; --loop: the "
                                         "synthetic world)")
    cache: str = option("", "--loader: image cache folder ('' = <root>/cache-<size> if present, as train.py)")
    num_workers: int = option(None, "--loader, --loop: DataLoader workers (default: train.py's choice)", minimum=0)
    model: dict = overrides(MaCoConfig, PRESETS, "model settings on the preset (e.g. --img-size 128)")

    def __post_init__(self):
        check_options(self)
        MaCoConfig.preset(self.preset, **self.model)  # a bad setting fails here, naming it


def machine_lines(device: torch.device) -> list[str]:
    """What the hardware offers, as PyTorch sees it."""
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} compute threads"]
    if device.type == "cuda":
        lines.append(f"GPU {torch.cuda.get_device_name(device)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    capabilities = torch.cpu.get_capabilities()
    lines.append(f"CPU {capabilities.get('cpu_name', '?')}: {capabilities.get('num_physical_cores', '?')} cores, "
                 f"vector capability {torch.backends.cpu.get_cpu_capability()}, "
                 f"avx512_bf16 {capabilities.get('avx512_bf16', False)}, "
                 f"amx_bf16 {capabilities.get('amx_bf16', False)}")
    return lines


def attention_kernels(model_cfg: MaCoConfig, batch: int, text_len: int, device: torch.device, precision: str) -> dict:
    """The kernel scaled_dot_product_attention picks for each attention call of a training step (the same question
    PyTorch asks itself: torch._fused_sdp_choice, with q, k, v of the call's shapes, dtype, mask and dropout)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    visible = 1 + int(model_cfg.num_patches * (1 - model_cfg.mask_ratio))  # cls + kept patches
    padding_mask = torch.ones(batch, 1, 1, text_len, dtype=torch.bool, device=device)  # (B, 1, 1, T) True = attend
    calls = {  # name: (heads, tokens, width, mask, dropout)
        "image encoder": (model_cfg.num_heads, visible, model_cfg.width, None, 0.0),
        "decoder": (model_cfg.decoder_num_heads, 1 + model_cfg.num_patches, model_cfg.decoder_width, None, 0.0),
        "text (padding mask, dropout)": (model_cfg.text_num_heads, text_len, model_cfg.text_width, padding_mask,
                                         model_cfg.text_dropout),
    }
    kernels = {}
    for name, (heads, tokens, width, mask, dropout) in calls.items():
        q = torch.zeros(batch, heads, tokens, width // heads, dtype=dtype, device=device)  # (B, H, L, Dh)
        kernels[name] = SDPA_KERNELS.get(torch._fused_sdp_choice(q, q, q, mask, dropout, False), "?")
    return kernels


def bench_step(cfg: BenchConfig, device: torch.device) -> None:
    model_cfg = MaCoConfig.preset(cfg.preset, **cfg.model)
    precisions = list(dict.fromkeys(["fp32", resolve_precision(cfg.precision, device)]))
    print(describe_precision(cfg.precision, device))
    for precision in precisions:
        kernels = attention_kernels(model_cfg, cfg.batch_size, cfg.text_len, device, precision)
        print(f"attention kernels, {precision}: " + "; ".join(f"{name} {kernel}" for name, kernel in kernels.items()))
    torch.manual_seed(0)
    model = MaCo(model_cfg).to(device)
    optimizer = model.configure_optimizer(lr=1e-4, weight_decay=0.05, device_type=device.type)
    print(f"AdamW fused: {bool(optimizer.defaults.get('fused'))}")
    compiled = torch.compile(model) if cfg.compile else None
    B, S = cfg.batch_size, model_cfg.input_size
    images = torch.randn(B, model_cfg.in_chans, S, S, device=device)
    input_ids = torch.randint(4, model_cfg.vocab_size, (B, cfg.text_len), device=device)
    attention_mask = torch.ones_like(input_ids)

    def step(step_model, precision):
        with autocast(device, precision):
            loss = step_model(images, input_ids, attention_mask)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(step_model, precision) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(step_model, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:
        step(model, "fp32")
    flops = counter.get_total_flops()
    variants = {(precision, mode): step_model for mode, step_model in (("eager", model), ("compiled", compiled))
                if step_model is not None for precision in precisions}
    first_call = {key: timed(step_model, key[0]) for key, step_model in variants.items()}  # compiles
    for _ in range(cfg.warmup):
        for key, step_model in variants.items():
            timed(step_model, key[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = {key: [] for key in variants}
    for _ in range(cfg.steps):  # interleaved: fp32, bf16, (compiled fp32, compiled bf16), fp32, ...
        for key, step_model in variants.items():
            seconds[key].append(timed(step_model, key[0]))
    settings = "".join(f", {k} {v}" for k, v in cfg.model.items())
    print(f"training step: preset {cfg.preset}{settings}, batch {B}, text {cfg.text_len} tokens, device {device}, "
          f"{cfg.steps} interleaved steps per variant after {cfg.warmup} warm-up; {flops / 1e9:.1f} GFLOP per step")
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    reference = statistics.median(seconds["fp32", "eager"])
    print(f"{'variant':<18}{'median s/step':>14}{'min':>9}{'max':>9}{'images/s':>10}{'TFLOP/s':>9}"
          f"{'vs fp32':>9}{'first call s':>14}" + (f"{'MFU':>7}" if peak else ""))
    for (precision, mode), times in seconds.items():
        median = statistics.median(times)
        mfu = f"{flops / median / peak:>7.1%}" if peak and precision == "bf16" else ""
        print(f"{precision + ' ' + mode:<18}{median:>14.4f}{min(times):>9.4f}{max(times):>9.4f}{B / median:>10.1f}"
              f"{flops / median / 1e12:>9.3f}{reference / median:>8.2f}x{first_call[precision, mode]:>14.1f}{mfu}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    else:
        import resource
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def bench_loader(cfg: BenchConfig) -> None:
    from pathlib import Path

    import numpy as np
    from torch.utils.data import DataLoader

    from data import Collate, MimicCXR, augment_image, report_to_caption, to_model_input, training_workers
    from util.tokenizer import train_tokenizer
    model_cfg = MaCoConfig.preset(cfg.preset, **cfg.model)
    cache = Path(cfg.cache) if cfg.cache else Path(cfg.root) / f"cache-{model_cfg.input_size}"
    cache = cache if cfg.cache or cache.exists() else None
    dataset = MimicCXR(cfg.root, split="train", image_size=model_cfg.input_size, in_chans=model_cfg.in_chans,
                       augment=True, cache=cache, seed=0)
    workers = training_workers(dataset) if cfg.num_workers is None else cfg.num_workers
    tokenizer = train_tokenizer(dataset.report_texts()[:2000], vocab_size=model_cfg.vocab_size)
    collate = Collate(tokenizer, model_cfg.max_len)
    print(f"loader: preset {cfg.preset}, batch {cfg.batch_size}, {model_cfg.input_size}-px input, cache "
          f"{cache or 'none'}, {workers} workers, {torch.get_num_threads()} compute threads")

    batches, start, images = iter(DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                                             collate_fn=collate, drop_last=True)), None, 0
    tokens = []
    for number, batch in zip(range(cfg.steps + 1), batches):
        if number == 0:  # worker start-up is not throughput
            start = time.perf_counter()
            continue
        images += batch["images"].shape[0]
        tokens.append(batch["input_ids"].shape[1])
    print(f"  DataLoader: {images / (time.perf_counter() - start):.0f} images/s; batches padded to "
          f"{min(tokens)}-{max(tokens)} tokens (median {statistics.median(tokens):.0f})")

    phases = {"read pixels": [], "augment": [], "caption": [], "normalise": []}
    n = min(len(dataset), cfg.steps * cfg.batch_size)
    items = []
    for index in range(n):
        generator = torch.Generator().manual_seed(index)
        moments = [time.perf_counter()]
        pixels = dataset._square_pixels(index)
        moments.append(time.perf_counter())
        pixels = augment_image(pixels, generator)
        moments.append(time.perf_counter())
        caption = report_to_caption(dataset.reports[dataset.items[index][2]], generator)
        moments.append(time.perf_counter())
        items.append({"image": to_model_input(pixels, model_cfg.in_chans), "caption": caption})
        moments.append(time.perf_counter())
        for name, began, ended in zip(phases, moments, moments[1:]):
            phases[name].append(ended - began)
    start = time.perf_counter()
    for first in range(0, n - cfg.batch_size + 1, cfg.batch_size):
        collate(items[first:first + cfg.batch_size])
    phases["collate (tokenize)"] = [(time.perf_counter() - start) / max(1, n // cfg.batch_size * cfg.batch_size)]
    total = sum(float(np.mean(times)) for times in phases.values())
    print(f"  one process, per image ({n} images): " + ", ".join(
        f"{name} {1e3 * float(np.mean(times)):.3f} ms" for name, times in phases.items())
          + f"; total {1e3 * total:.3f} ms = {1 / total:.0f} images/s, {1e3 * total * cfg.batch_size:.1f} ms per batch")


def bench_loop(cfg: BenchConfig) -> None:
    import tempfile

    import train
    with tempfile.TemporaryDirectory() as out_dir:
        train_cfg = train.TrainConfig(root=cfg.root, preset=cfg.preset, model=cfg.model, batch_size=cfg.batch_size,
                                      device=cfg.device,
                                      precision=cfg.precision, num_workers=cfg.num_workers, out_dir=out_dir,
                                      stop_after_steps=cfg.warmup + cfg.steps, eval=False)
        run = train.setup(train_cfg, set())
        run.model.train()
        batch_seconds, step_seconds, batches = [], [], train.step_batches(run)
        for number in range(cfg.warmup + cfg.steps):
            start = time.perf_counter()
            step, micro_batches = next(batches)
            got = time.perf_counter()
            train.train_step(run, step, micro_batches)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            if number >= cfg.warmup:
                batch_seconds.append(got - start)
                step_seconds.append(time.perf_counter() - got)
    batch, step = sum(batch_seconds), sum(step_seconds)
    print(f"train.py loop: {cfg.steps} steps after {cfg.warmup}, {run.cfg.num_workers} loader workers, "
          f"{run.cfg.precision}: getting a batch {1e3 * statistics.median(batch_seconds):.1f} ms, the step "
          f"{1e3 * statistics.median(step_seconds):.1f} ms (medians); "
          f"run rate / step-alone rate {step / (batch + step):.3f}")


def run_bench(cfg: BenchConfig) -> None:
    _, _, device = setup_distributed(cfg.device)  # as train.py: on a GPU, fp32 matrix products in TF32
    for line in machine_lines(device):
        print(line)
    if cfg.loader:
        bench_loader(cfg)
    elif cfg.loop:
        bench_loop(cfg)
    else:
        bench_step(cfg, device)


def main(argv=None) -> int:
    return run_script(BenchConfig, run_bench, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
