"""Where the computation runs: device choice, the distributed process group, mixed precision.

One place for what differs between a laptop CPU, one GPU and `torchrun` on several GPUs, so that train.py,
eval_zeroshot.py, finetune.py and bench.py behave alike (and the GPU-only paths can be tested on a CPU by
simulating CUDA). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is a single process.
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


def uses_bf16(device: torch.device) -> bool:
    """bf16 autocast on GPUs that support it (Ampere and newer); fp32 everywhere else (CPU included)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device):
    """The mixed-precision context of a forward pass on `device` (see uses_bf16)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if uses_bf16(device) else contextlib.nullcontext()
