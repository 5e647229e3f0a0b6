"""train.py: learning, exact resumption, the MAE init report, and clear errors for bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import data
import train
from maco import MaCo, MaCoConfig, load
from util.cli import parse_config


def run(argv):
    return train.train(parse_config(train.TrainConfig, argv))


def small_run_args(root, out, *extra):
    return ["--root", str(root), "--out-dir", str(out), "--batch-size", "8", "--num-workers", "0",
            "--no-eval", "--log-interval", "1", *extra]


def logged(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_short_cpu_run_lowers_the_total_loss(synthetic_root, tmp_path):
    result = run(small_run_args(synthetic_root, tmp_path, "--epochs", "6", "--lr", "2e-3", "--ckpt-interval", "1000"))
    losses = [row["loss"] for row in logged(tmp_path)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "loss.png").stat().st_size > 0
    model_cfg = torch.load(result["checkpoint"], weights_only=True)["model_config"]
    assert model_cfg["img_size"] == MaCoConfig.preset("tiny").img_size


def test_resumed_run_reproduces_the_uninterrupted_losses(synthetic_root, tmp_path):
    common = ("--epochs", "2", "--ckpt-interval", "3")
    run(small_run_args(synthetic_root, tmp_path / "straight", *common))
    run(small_run_args(synthetic_root, tmp_path / "killed", *common, "--stop-after-steps", "5"))
    checkpoint = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 5
    run(["--resume", str(tmp_path / "killed" / "checkpoint.pt"), "--out-dir", str(tmp_path / "killed"),
         "--num-workers", "0", "--no-eval"])
    straight, resumed = logged(tmp_path / "straight"), logged(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]


def test_caption_sources_give_the_training_set_its_reports(synthetic_root, tmp_path):
    cfg = train.resolve(train.TrainConfig(root=str(synthetic_root), captions="impression"))
    model_cfg = MaCoConfig.preset("tiny")
    impression = train.build_dataset(cfg, model_cfg, is_main=True)
    full = train.build_dataset(train.resolve(train.TrainConfig(root=str(synthetic_root))), model_cfg, is_main=True)
    positive = train.build_dataset(train.resolve(train.TrainConfig(root=str(synthetic_root), captions="positive")),
                                   model_cfg, is_main=True)
    assert len(impression) == len(full) == len(positive)
    for key in full.reports:  # the impression is part of the full report; the positive report holds no negation
        impression_sentences = data.report_sentences(impression.reports[key])
        assert set(impression_sentences) < set(data.report_sentences(full.reports[key]))
        assert positive.reports[key] == data.positive_report(full.reports[key])


def test_init_from_a_train_checkpoint_copies_the_whole_model_and_keeps_its_tokenizer(synthetic_root, tmp_path):
    run(small_run_args(synthetic_root, tmp_path / "first", "--epochs", "1", "--stop-after-steps", "2"))
    first = tmp_path / "first" / "checkpoint.pt"
    source, tokenizer = load(first)
    assert train.init_tokenizer(str(first)).get_vocab() == tokenizer.get_vocab()
    fresh = MaCo(source.cfg)
    load(first, into=fresh)
    for (name, a), b in zip(source.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="other shapes than the one being trained"):
        load(first, into=MaCo(MaCoConfig.preset("tiny", img_size=32, vocab_size=source.cfg.vocab_size)))
    result = run(small_run_args(synthetic_root, tmp_path / "second", "--epochs", "1", "--stop-after-steps", "1",
                                "--init", str(first), "--seed", "3"))
    assert torch.load(result["checkpoint"], weights_only=True)["tokenizer"] == tokenizer.to_str()


def test_mae_init_reports_loaded_and_missing_keys_and_rejects_shape_mismatches(tmp_path, capsys):
    model = MaCo(MaCoConfig.preset("tiny"))
    state = {k: torch.randn_like(v) for k, v in model.image_encoder.state_dict().items() if k != "norm.bias"}
    state["head.weight"] = torch.randn(10, 192)
    torch.save({"model": state}, tmp_path / "mae.pth")
    load(tmp_path / "mae.pth", into=model)
    report = capsys.readouterr().out
    assert "loaded" in report and "norm.bias" in report and "head.weight" in report
    assert torch.equal(model.image_encoder.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    state["blocks.0.attn.qkv.weight"] = torch.randn(3 * 768, 768)
    torch.save({"model": state}, tmp_path / "mae_base.pth")
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.weight: file \(2304, 768\) vs model \(576, 192\)"):
        load(tmp_path / "mae_base.pth", into=model)


@pytest.mark.parametrize("argv, message", [
    (["--data", "chexray"], "--data: invalid choice: 'chexray'"),
    (["--data", "mimic"], "needs --root"),
    (["--data", "mimic", "--root", "no/such/folder"], "no/such/folder"),
    (["--init", "no/such/mae.pth"], "no such file"),
    (["--resume", "no/such/checkpoint.pt"], "no such file"),
])
def test_bad_arguments_give_a_clear_message_and_exit_code_2(argv, message, synthetic_root, tmp_path, capsys):
    if "--data" not in argv:  # the synthetic default: point it at the session's small world
        argv = argv + ["--root", str(synthetic_root)]
    assert train.main(argv + ["--out-dir", str(tmp_path), "--num-workers", "0", "--no-eval"]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_resume_file_is_reported(synthetic_root, tmp_path, capsys):
    (tmp_path / "broken.pt").write_text("not a checkpoint")
    assert train.main(["--resume", str(tmp_path / "broken.pt")]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_batch_larger_than_the_dataset_is_refused(synthetic_root, tmp_path, capsys):
    assert train.main(small_run_args(synthetic_root, tmp_path, "--batch-size", "100000")) == 2
    assert "lower --batch-size" in capsys.readouterr().err


def test_non_finite_loss_stops_with_its_step_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path, capsys):
    # an absurd learning rate turns the weights to inf after the first update
    argv = small_run_args(synthetic_root, tmp_path, "--epochs", "1", "--lr", "1e30", "--warmup-epochs", "0",
                          "--ckpt-interval", "1")
    assert train.main(argv) == 2
    error = capsys.readouterr().err
    assert "non-finite at step" in error and "last good checkpoint" in error
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


# ---------------------------------------------------------------------------------------------------------
# Reliability: unreadable images, output folders, resuming

def copy_world(source, target, images: str):
    """A copy of the synthetic world, without its image caches, whose JPEGs are kept, deleted ("missing") or
    overwritten ("corrupt")."""
    skipped = ("cache-*", "*.jpg") if images == "missing" else ("cache-*",)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*skipped))
    if images == "corrupt":
        for path in target.rglob("*.jpg"):
            path.write_bytes(b"not a jpeg")
    return target


def test_a_world_without_any_image_file_stops_at_once_with_a_clear_error(synthetic_root, tmp_path, capsys):
    root = copy_world(synthetic_root, tmp_path / "world", "missing")
    argv = ["--data", "mimic", "--root", str(root), "--preset", "tiny", "--epochs", "1", "--batch-size", "16",
            "--num-workers", "0", "--out-dir", str(tmp_path / "run")]
    assert train.main(argv) == 2
    assert "none of the 133 images of this selection exists" in capsys.readouterr().err


def test_a_world_without_any_report_stops_at_once_with_a_clear_error(synthetic_root, tmp_path, capsys):
    root = tmp_path / "world"
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns("*.txt", "cache-*"))
    argv = ["--data", "mimic", "--root", str(root), "--preset", "tiny", "--epochs", "1", "--batch-size", "16",
            "--num-workers", "0", "--out-dir", str(tmp_path / "run")]
    assert train.main(argv) == 2
    captured = capsys.readouterr()
    assert "0 images" in captured.out and "133 without a report" in captured.out
    assert "no image of this selection has a report to pair it with" in captured.err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_world_whose_images_are_all_unreadable_stops_after_a_few_steps(synthetic_root, tmp_path, capsys):
    root = copy_world(synthetic_root, tmp_path / "world", "corrupt")
    assert train.main(small_run_args(root, tmp_path / "run", "--epochs", "1")) == 2
    assert "no image could be read in 10 consecutive steps (80 skipped so far)" in capsys.readouterr().err


def test_unreadable_images_are_skipped_once_each_and_every_step_advances(synthetic_root, tmp_path):
    root = copy_world(synthetic_root, tmp_path / "world", "keep")
    dataset = train.MimicCXR(root, split="train", image_size=128, in_chans=1)
    order = train.epoch_indices(len(dataset), len(dataset), 0, 0, 0, 1)
    broken = order[8:16] + order[20:23]  # all of the second batch of 8, and 3 of the third
    for index in broken:
        Path(dataset.items[index][1]).write_bytes(b"not a jpeg")
    result = run(small_run_args(root, tmp_path / "run", "--epochs", "1"))
    steps = [row["step"] for row in logged(tmp_path / "run")]
    assert steps == list(range(1, len(dataset) // 8 + 1))  # no step repeated, none stalled
    assert result["skipped"] == len(broken) and logged(tmp_path / "run")[-1]["skipped"] == len(broken)


def test_an_unwritable_out_dir_fails_before_any_work(synthetic_root, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert train.main(small_run_args(synthetic_root, tmp_path / "a_file" / "run")) == 2
    error = capsys.readouterr()
    assert "--out-dir" in error.err and "cannot write there" in error.err and "training" not in error.out


def test_a_fresh_run_never_overwrites_a_run_already_there(synthetic_root, tmp_path, capsys):
    args = small_run_args(synthetic_root, tmp_path, "--epochs", "1", "--stop-after-steps", "2")
    run(args)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert train.main(args) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    run(args + ["--overwrite", "--seed", "1"])
    assert (tmp_path / "checkpoint.pt").read_bytes() != before


def test_resuming_into_another_folder_is_a_branch_that_leaves_the_source_untouched(synthetic_root, tmp_path):
    common = ("--epochs", "1", "--ckpt-interval", "4")
    run(small_run_args(synthetic_root, tmp_path / "straight", *common))
    run(small_run_args(synthetic_root, tmp_path / "source", *common, "--stop-after-steps", "5"))
    source = {name: (tmp_path / "source" / name).read_bytes() for name in ("checkpoint.pt", "log.jsonl")}
    run(["--resume", str(tmp_path / "source" / "checkpoint.pt"), "--out-dir", str(tmp_path / "branch"),
         "--num-workers", "0", "--no-eval"])
    assert {name: (tmp_path / "source" / name).read_bytes() for name in source} == source
    straight, branch = logged(tmp_path / "straight"), logged(tmp_path / "branch")
    assert [r["step"] for r in branch] == [r["step"] for r in straight]
    assert [r["loss"] for r in branch] == pytest.approx([r["loss"] for r in straight], abs=1e-6)


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "5e-3", "--lr 0.005 contradicts the checkpoint's 0.001"),
    ("--preset", "base", "--preset base contradicts the checkpoint's tiny"),
    ("--mask-ratio", "0.75", "--mask-ratio 0.75 contradicts the checkpoint's 0.5"),
])
def test_resume_with_a_contradicting_setting_is_an_error(synthetic_root, tmp_path, capsys, flag, value, message):
    run(small_run_args(synthetic_root, tmp_path / "source", "--epochs", "1", "--stop-after-steps", "2"))
    argv = ["--resume", str(tmp_path / "source" / "checkpoint.pt"), "--out-dir", str(tmp_path / "next"), flag, value]
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "next" / "checkpoint.pt").exists()


def test_resume_into_a_folder_holding_another_run_is_refused(synthetic_root, tmp_path, capsys):
    run(small_run_args(synthetic_root, tmp_path / "a", "--epochs", "1", "--stop-after-steps", "2"))
    run(small_run_args(synthetic_root, tmp_path / "b", "--epochs", "1", "--stop-after-steps", "2"))
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    assert train.main(["--resume", str(tmp_path / "a" / "checkpoint.pt"), "--out-dir", str(tmp_path / "b")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before
