"""The speed switches change nothing they should not (docs/speed.md).

--precision: a bf16 autocast step agrees with fp32 within a stated tolerance, fp32 is exactly the plain step, and
train.py prints its choice, records it in the checkpoint and keeps it on resume (bf16 autocast runs on any x86 CPU,
slowly where there are no bf16 units, so these run everywhere). The data path: the synthetic world's image cache is
built once and read in the training process, and the batches are exactly those decoded from the JPEG files."""

import json
import shutil

import pytest
import torch

import train
from maco import MaCo, MaCoConfig
from util.cli import parse_config
from util.devices import autocast

CPU = torch.device("cpu")


def tiny_step(model, precision: str | None):
    """Loss and gradients of one training forward/backward on fixed inputs and masks; precision None: no context."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 1, 128, 128, generator=generator)  # (B, C, 2S, 2S)
    input_ids = torch.randint(4, 200, (16, 40), generator=generator)  # (B, T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, 30:] = 0  # half the reports padded
    model.zero_grad(set_to_none=True)
    model.eval()  # no dropout: the two precisions see the same network; the masks come from the generator
    if precision is None:
        out = model(images, input_ids, attention_mask, generator=torch.Generator().manual_seed(1))
    else:
        with autocast(CPU, precision):
            out = model(images, input_ids, attention_mask, generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MaCo(MaCoConfig.preset("tiny", vocab_size=200))


def test_a_bf16_step_agrees_with_fp32_within_tolerance_and_keeps_fp32_losses_and_parameters(tiny_model):
    """Tolerance: the losses within 1% of each other; the whole gradient within 5% (relative L2 error; measured
    about 2%, bf16 keeps 8 significant bits) and at a cosine above 0.999; each tensor whose gradient is not
    negligible (norm above 1e-3 of the whole gradient's) at a cosine above 0.99."""
    out32, grads32 = tiny_step(tiny_model, "fp32")
    out16, grads16 = tiny_step(tiny_model, "bf16")
    for key in ("loss", "loss_rec", "loss_con"):
        assert out16[key].dtype == torch.float32  # losses computed in fp32 (loss.py upcasts)
        assert out16[key].item() == pytest.approx(out32[key].item(), rel=0.01), key
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in tiny_model.parameters())
    whole32 = torch.cat([g.flatten() for g in grads32.values()])
    whole16 = torch.cat([grads16[name].flatten() for name in grads32])
    assert (whole16 - whole32).norm() / whole32.norm() < 0.05
    assert torch.nn.functional.cosine_similarity(whole16, whole32, dim=0) > 0.999
    for name, grad in grads32.items():
        if grad.norm() > 1e-3 * whole32.norm():  # e.g. the attention key biases have exactly zero gradient in math
            assert torch.nn.functional.cosine_similarity(grads16[name].flatten(), grad.flatten(), dim=0) > 0.99, name


def test_fp32_precision_is_exactly_the_step_without_autocast(tiny_model):
    out_plain, grads_plain = tiny_step(tiny_model, None)
    out32, grads32 = tiny_step(tiny_model, "fp32")
    assert torch.equal(out_plain["loss"], out32["loss"])
    assert all(torch.equal(grads_plain[name], grads32[name]) for name in grads_plain)


def run(argv):
    cfg = parse_config(train.TrainConfig, argv)
    return train.train(cfg, train.given_flags(cfg, argv))


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_train_prints_records_and_resumes_with_its_precision(synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    common = ["--root", str(synthetic_root), "--batch-size", "8", "--num-workers", "0", "--no-eval",
              "--log-interval", "1", "--epochs", "1"]
    run(common + ["--out-dir", str(tmp_path / "default"), "--stop-after-steps", "3"])
    assert "precision fp32 (auto: CPU without amx_bf16 or avx512_bf16)" in capsys.readouterr().out
    run(common + ["--out-dir", str(tmp_path / "fp32"), "--stop-after-steps", "3", "--precision", "fp32"])
    assert losses(tmp_path / "fp32") == losses(tmp_path / "default")  # fp32 is exact: the run auto chose here

    run(common + ["--out-dir", str(tmp_path / "straight"), "--stop-after-steps", "4", "--precision", "bf16"])
    assert "precision bf16 (--precision bf16)" in capsys.readouterr().out
    run(common + ["--out-dir", str(tmp_path / "killed"), "--stop-after-steps", "2", "--precision", "bf16"])
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["train_config"]["precision"] == "bf16"
    run(["--resume", str(checkpoint), "--out-dir", str(tmp_path / "killed"), "--num-workers", "0", "--no-eval",
         "--stop-after-steps", "4"])  # no --precision: the checkpoint's bf16
    assert "bf16" in capsys.readouterr().out
    assert torch.load(checkpoint, weights_only=True)["train_config"]["precision"] == "bf16"
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert losses(tmp_path / "straight")[:3] != losses(tmp_path / "default")  # bf16 is another computation
    run(["--resume", str(checkpoint), "--out-dir", str(tmp_path / "branch"), "--num-workers", "0", "--no-eval",
         "--stop-after-steps", "5", "--precision", "fp32"])  # given: it wins, and is said
    assert "resume: --precision fp32 (was bf16)" in capsys.readouterr().out
    assert torch.load(tmp_path / "branch" / "checkpoint.pt", weights_only=True)["train_config"]["precision"] == "fp32"


def test_the_default_run_caches_the_synthetic_world_and_trains_exactly_as_from_the_jpegs(synthetic_root, tmp_path,
                                                                                         capsys):
    root = tmp_path / "world"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("cache-*"))
    common = ["--root", str(root), "--batch-size", "8", "--no-eval", "--log-interval", "1", "--stop-after-steps", "3"]
    run(common + ["--out-dir", str(tmp_path / "cached")])
    assert (root / "cache-128" / "progress.json").exists()  # built by the run: 128 px, tiny's training input
    assert "0 loader workers" in capsys.readouterr().out  # cached: read in the training process
    run(common + ["--out-dir", str(tmp_path / "jpeg"), "--cache", str(tmp_path / "no-cache"), "--num-workers", "2"])
    assert "2 loader workers" in capsys.readouterr().out
    assert losses(tmp_path / "cached") == losses(tmp_path / "jpeg")


def test_bench_prints_the_machine_both_precisions_the_kernels_and_the_loops_ratio(synthetic_root, capsys):
    from tools import bench
    assert bench.main(["--batch-size", "2", "--steps", "1", "--warmup", "0", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "avx512_bf16" in out and "amx_bf16" in out and "compute threads" in out
    assert "text (padding mask, dropout)" in out and "fp32 eager" in out and "bf16 eager" in out
    common = ["--root", str(synthetic_root), "--batch-size", "8", "--steps", "2", "--warmup", "1"]
    assert bench.main(common + ["--loop"]) == 0
    ratio = float(capsys.readouterr().out.split("run rate / step-alone rate ")[1].split()[0])
    assert 0 < ratio <= 1
    assert bench.main(common + ["--loader"]) == 0
    assert "DataLoader" in capsys.readouterr().out


def test_evaluation_under_bf16_scores_in_float32_close_to_fp32():
    import eval_zeroshot as ez
    from util.tokenizer import train_tokenizer
    captions = ["there is cardiomegaly. ", "no pleural effusion. ", "the lung is clear. "] * 4
    tokenizer = train_tokenizer(captions, vocab_size=200)
    torch.manual_seed(0)
    model = MaCo(MaCoConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size())).eval()
    images = torch.randn(4, 1, 64, 64)  # (B, C, S, S) the encoder's input
    prompts = ez.class_prompts(["Cardiomegaly", "Pleural Effusion"])
    scores32 = ez.zero_shot_scores(model, images, prompts, tokenizer)
    maps32 = ez.similarity_map(model, images, ["cardiomegaly."] * 4, tokenizer)
    with autocast(CPU, "bf16"):
        scores16 = ez.zero_shot_scores(model, images, prompts, tokenizer)
        maps16 = ez.similarity_map(model, images, ["cardiomegaly."] * 4, tokenizer)
    assert scores16.dtype == torch.float32 and maps16.dtype == torch.float32
    assert torch.allclose(scores16, scores32, atol=0.01)  # probabilities (measured 0.004 apart at most)
    assert (maps16 - maps32).abs().mean() < 0.03  # maps scaled to [-1, 1] (measured 0.006 apart on average)
