"""The GPU-only paths, checked on a CPU by simulating CUDA: device choice on one GPU, an explicit --device cuda:N,
torchrun with two local ranks (NCCL), the precision `auto` picks, bf16 autocast, fused AdamW, pinned memory and
--compile."""

import pytest
import torch

import train
from maco import MaCo, MaCoConfig
from util import devices


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with `count` simulated GPUs: is_available, device_count and set_device are replaced; the devices
    that set_device received and the backend init_process_group was asked for are recorded."""
    calls = {"set_device": [], "backend": []}

    def install(count: int, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.cuda, "set_device", calls["set_device"].append)
        monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls["backend"].append(backend))
        return calls

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # set by setup_distributed
    yield install
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_auto_on_a_one_gpu_machine_selects_cuda_0_with_an_index(fake_cuda):
    calls = fake_cuda(1)
    rank, world, device = devices.setup_distributed("auto")
    assert (rank, world, device) == (0, 1, torch.device("cuda", 0))
    assert calls["set_device"] == [torch.device("cuda", 0)] and calls["set_device"][0].index == 0  # the fixed bug
    assert calls["backend"] == [] and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_plain_cuda_gets_the_index_set_device_needs(fake_cuda):
    calls = fake_cuda(1)
    assert devices.setup_distributed("cuda")[2] == torch.device("cuda", 0)
    assert calls["set_device"][0].index == 0


def test_an_explicit_gpu_index_is_used_and_checked(fake_cuda):
    calls = fake_cuda(2)
    assert devices.setup_distributed("cuda:1")[2] == torch.device("cuda", 1)
    assert calls["set_device"] == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match=r"cuda:2: this machine has 2 GPU\(s\), numbered 0..1"):
        devices.pick_device("cuda:2")


def test_torchrun_with_two_local_ranks_gives_each_process_its_gpu_and_nccl(fake_cuda, monkeypatch):
    calls = fake_cuda(2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.setup_distributed("auto") == (1, 2, torch.device("cuda", 1))
    assert calls["set_device"] == [torch.device("cuda", 1)] and calls["backend"] == ["nccl"]
    with pytest.raises(ValueError, match="under torchrun every process takes the GPU of its LOCAL_RANK"):
        devices.setup_distributed("cuda:0")


def test_torchrun_on_cpus_uses_gloo(fake_cuda, monkeypatch):
    calls = fake_cuda(0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert devices.setup_distributed("auto")[2] == torch.device("cpu") and calls["backend"] == ["gloo"]


@pytest.mark.parametrize("name, message", [("cuda", "no CUDA GPU is available"), ("tpu", "expected auto, cpu"),
                                           ("cuda:x", "expected auto, cpu")])
def test_a_device_that_is_not_there_is_a_clear_error(fake_cuda, name, message):
    fake_cuda(0)
    with pytest.raises(ValueError, match=message):
        devices.pick_device(name)


def test_auto_precision_is_bf16_on_gpus_with_bf16_and_on_cpus_with_native_bf16(fake_cuda, monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    fake_cuda(1, bf16=True)
    assert devices.resolve_precision("auto", gpu) == "bf16"
    fake_cuda(1, bf16=False)
    assert devices.resolve_precision("auto", gpu) == "fp32"
    with pytest.raises(ValueError, match="does not support bf16"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
        devices.resolve_precision("bf16", gpu)
    for flags, expected in [({"amx_bf16": True, "avx512_bf16": True}, "bf16"),  # Intel Sapphire Rapids
                            ({"amx_bf16": False, "avx512_bf16": True}, "bf16"),  # AMD Zen 4
                            ({"amx_bf16": False, "avx512_bf16": False, "avx2": True}, "fp32"),  # bf16 emulated
                            ({"architecture": "aarch64"}, "fp32")]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
        assert devices.resolve_precision("auto", cpu) == expected, flags
        assert devices.describe_precision("auto", cpu).startswith(f"precision {expected} (auto: ")
    assert devices.resolve_precision("fp32", cpu) == "fp32" and devices.resolve_precision("bf16", cpu) == "bf16"


def test_bf16_autocast_on_the_device_and_nothing_for_fp32(fake_cuda):
    fake_cuda(1, bf16=True)
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        context = devices.autocast(device, "bf16")
        assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
        assert context.device == device.type
        assert not isinstance(devices.autocast(device, "fp32"), torch.autocast)
    with pytest.raises(ValueError, match="resolved precision"):
        devices.autocast(torch.device("cpu"), "auto")


def test_adamw_is_fused_for_cuda_and_not_for_the_cpu():
    model = MaCo(MaCoConfig.preset("tiny", vocab_size=50))
    assert model.configure_optimizer(1e-3, 0.05, device_type="cuda").defaults["fused"] is True
    assert not model.configure_optimizer(1e-3, 0.05, device_type="cpu").defaults["fused"]


@pytest.fixture
def cpu_run(synthetic_root, tmp_path):
    cfg = train.TrainConfig(root=str(synthetic_root), out_dir=str(tmp_path), batch_size=8, num_workers=0, eval=False)
    return cfg


def test_pinned_memory_exactly_when_training_on_a_gpu(cpu_run, monkeypatch):
    run = train.setup(cpu_run, set())
    seen = []

    def loader(dataset, **options):
        seen.append(options["pin_memory"])
        return iter([{"skipped": 0}] * 1000)

    monkeypatch.setattr(train, "DataLoader", loader)
    next(train.step_batches(run))
    run.device = torch.device("cuda", 0)
    next(train.step_batches(run))
    assert seen == [False, True]


def test_compile_flag_compiles_the_trained_model(cpu_run, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    run = train.setup(train.TrainConfig(**{**vars(cpu_run), "compile": True}), set())
    assert compiled == [run.model] and run.train_model is run.model
    assert train.setup(cpu_run, set()).train_model is not None and len(compiled) == 1
