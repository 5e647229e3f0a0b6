"""Measure, don't guess: the speed of one MaCo training step, and separately of the data loader.

    python -m tools.bench --preset tiny --batch-size 32
    python -m tools.bench --preset base --batch-size 2
    python -m tools.bench --loader --root data/synthetic        # images/s of the training DataLoader

The step (forward, backward, AdamW) runs on random tensors of the preset's shapes, reports padded to
--text-len tokens, so nothing but the model is timed. FLOPs are counted once with PyTorch's FlopCounterMode;
on a GPU whose peak is known the model FLOPs utilisation (MFU) is printed too.
"""

import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from maco import PRESETS, MaCo, MaCoConfig
from util.cli import check_options, option, run_script
from util.devices import autocast, pick_device, uses_bf16

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks


@dataclass
class BenchConfig:
    preset: str = option("tiny", "model preset", choices=tuple(PRESETS))
    batch_size: int = option(32, "pairs per step", minimum=1)
    text_len: int = option(100, "report tokens per pair (padded length, at most the preset's max_len)", minimum=1)
    steps: int = option(10, "timed steps", minimum=1)
    warmup: int = option(2, "untimed steps first", minimum=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    compile: bool = option(False, "torch.compile the model")
    loader: bool = option(False, "benchmark the training DataLoader instead of the step")
    root: str = option("data/synthetic", "--loader: dataset root (MIMIC-CXR-JPG layout)")
    cache: str = option("", "--loader: image cache folder ('' = read the image files)")
    num_workers: int = option(2, "--loader: DataLoader workers", minimum=0)

    def __post_init__(self):
        check_options(self)


def bench_step(cfg: BenchConfig, device: torch.device) -> dict:
    model_cfg = MaCoConfig.preset(cfg.preset)
    torch.manual_seed(0)
    model = MaCo(model_cfg).to(device)
    optimizer = model.configure_optimizer(lr=1e-4, weight_decay=0.05, device_type=device.type)
    step_model = torch.compile(model) if cfg.compile else model
    B, S = cfg.batch_size, model_cfg.input_size
    images = torch.randn(B, model_cfg.in_chans, S, S, device=device)
    input_ids = torch.randint(4, model_cfg.vocab_size, (B, cfg.text_len), device=device)
    attention_mask = torch.ones_like(input_ids)

    def step():
        with autocast(device):
            loss = step_model(images, input_ids, attention_mask)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(cfg.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / cfg.steps
    flops = counter.get_total_flops()
    result = {"seconds_per_step": seconds, "images_per_s": B / seconds, "tflops_per_s": flops / seconds / 1e12}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak and uses_bf16(device):
            result["mfu"] = flops / seconds / peak
    else:
        import resource
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def bench_loader(cfg: BenchConfig) -> dict:
    from torch.utils.data import DataLoader

    from data import Collate, MimicCXR
    from util.tokenizer import train_tokenizer
    model_cfg = MaCoConfig.preset(cfg.preset)
    dataset = MimicCXR(cfg.root, split="train", image_size=model_cfg.input_size, in_chans=model_cfg.in_chans,
                       augment=True, cache=cfg.cache or None, seed=0)
    tokenizer = train_tokenizer(dataset.report_texts()[:2000], vocab_size=model_cfg.vocab_size)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                        collate_fn=Collate(tokenizer, model_cfg.max_len), drop_last=True)
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(cfg.steps), batches):
        images += batch["images"].shape[0]
    return {"images_per_s": images / (time.perf_counter() - start), "image_side": model_cfg.input_size}


def run_bench(cfg: BenchConfig) -> None:
    device = pick_device(cfg.device)
    result = bench_loader(cfg) if cfg.loader else bench_step(cfg, device)
    what = f"loader ({cfg.num_workers} workers, cache: {cfg.cache or 'none'})" if cfg.loader else "training step"
    print(f"{what}: preset {cfg.preset}, batch {cfg.batch_size}, device {device}, {torch.get_num_threads()} threads")
    for key, value in result.items():
        print(f"  {key:>18}: {value:.4g}" if isinstance(value, float) else f"  {key:>18}: {value}")


def main(argv=None) -> int:
    return run_script(BenchConfig, run_bench, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
