"""Where the computation runs: device choice, the distributed process group, mixed precision.

One place for what differs between a laptop CPU, one GPU and `torchrun` on several GPUs, so that train.py,
eval_zeroshot.py, finetune.py and bench.py behave alike (and the GPU-only paths can be tested on a CPU by
simulating CUDA). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is a single process.

Precision (`--precision auto | fp32 | bf16`): bf16 is autocast only (matrix products and attention in bf16);
parameters, gradients and optimizer state stay fp32, and the losses are computed in fp32 (loss.py upcasts).
`auto` picks bf16 where the hardware multiplies bf16 natively: CUDA GPUs that support bf16 (Ampere and newer), and
x86 CPUs with AMX tiles (`amx_bf16`: Intel Xeon Sapphire Rapids and newer) or the AVX512_BF16 dot-product
instruction (`avx512_bf16`: AMD Zen 4 and 5, Intel Cooper Lake), as torch.cpu.get_capabilities() reports them.
On a Zen 4 CPU with AVX512_BF16 and no AMX a bf16 step measured 1.3x (tiny, batch 32) to 1.85x (base, batch 8)
faster than fp32 (docs/speed.md). Elsewhere (AVX2 or plain AVX512 CPUs, where bf16 is emulated; ARM CPUs, not measured) fp32.
"""

import contextlib
import os

import torch


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> the GPU of this process if there is one, else the CPU; "cpu"; "cuda" -> cuda:<local_rank>;
    "cuda:N" -> that GPU. A GPU that is not there is a clear error, not a failure deep inside PyTorch."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu (or auto)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"numbered 0..{torch.cuda.device_count() - 1}")
        device = torch.device("cuda", index)  # always with an index: torch.cuda.set_device needs one
    return device


def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun, also joins the process group (NCCL on GPUs,
    gloo on CPUs). Each process of a multi-GPU run takes the GPU of its LOCAL_RANK."""
    rank, world, local_rank = (int(os.environ.get(key, default)) for key, default in
                               (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if world > 1 and device_name.startswith("cuda:"):
        raise ValueError(f"--device {device_name}: under torchrun every process takes the GPU of its LOCAL_RANK; "
                         f"pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_bf16_instructions() -> list[str]:
    """The native bf16 matrix instructions of this CPU, as PyTorch's cpuinfo reports them: amx_bf16, avx512_bf16."""
    capabilities = torch.cpu.get_capabilities()
    return [name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name, False)]


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on a CUDA GPU that supports bf16 and on a CPU with native bf16 instructions, else "fp32";
    "fp32" and "bf16" stay as given (bf16 on a GPU without bf16 support is a clear error)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and device.type == "cuda" and not gpu_bf16:
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; use fp32")
    if precision != "auto":
        return precision
    return "bf16" if gpu_bf16 or (device.type == "cpu" and cpu_bf16_instructions()) else "fp32"


def describe_precision(precision: str, device: torch.device) -> str:
    """One line for the start-up print: what `precision` resolves to on `device`, and why."""
    resolved = resolve_precision(precision, device)
    if precision != "auto":
        return f"precision {resolved} (--precision {precision})"
    if device.type == "cuda":
        why = "GPU with bf16" if resolved == "bf16" else "this GPU has no bf16"
    elif resolved == "bf16":
        why = "CPU with " + " and ".join(cpu_bf16_instructions())
    else:
        why = "CPU without amx_bf16 or avx512_bf16"
    return f"precision {resolved} (auto: {why})"


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of a forward pass: bf16 autocast on `device` for precision "bf16", nothing for
    "fp32" (resolve "auto" first with resolve_precision)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast: expected a resolved precision, fp32 or bf16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
