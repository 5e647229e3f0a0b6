"""finetune.py: the head, exact encoder loading, nested label subsets, the released split files, the schedule,
and clear errors for bad input; slow: a short fine-tune lowers the loss and its best weights reload exactly."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import finetune as ft
from fixtures_eval import (
    SIIM_NEGATIVE,
    SIIM_POSITIVE,
    SIIM_TWO_REGIONS,
    make_chexpert,
    make_nih,
    make_rsna,
    make_siim,
    write_text,
)
from maco import MaCo, MaCoConfig, load
from util import eval_datasets
from util.tokenizer import train_tokenizer


def write_train_checkpoint(path, **overrides) -> MaCo:
    """A checkpoint with the keys train.py writes that maco.load needs; weights drawn with seed 1."""
    tokenizer = train_tokenizer(["no finding. ", "small left pleural effusion. "], vocab_size=100)
    cfg = MaCoConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size(), **overrides)
    torch.manual_seed(1)
    model = MaCo(cfg).eval()
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg), "tokenizer": tokenizer.to_str(),
                "step": 7}, path)
    return model


def error_of(argv, capsys) -> str:
    assert ft.main(argv) == 2
    return capsys.readouterr().err


# -- the model ------------------------------------------------------------------------------------------------

def test_pooling_averages_the_patch_tokens_and_ignores_the_cls_token():
    tokens = torch.randn(3, 1 + 4, 6)
    pooled = ft.pool_patch_tokens(tokens)
    assert pooled.shape == (3, 6)
    assert torch.allclose(pooled, tokens[:, 1:].sum(1) / 4)
    tokens[:, 0] = 1e6
    assert torch.equal(ft.pool_patch_tokens(tokens), pooled)


def test_classifier_head_is_layernorm_then_linear_on_the_pooled_last_block_tokens():
    torch.manual_seed(0)
    cfg = MaCoConfig.preset("tiny")
    model = ft.Classifier(ft.new_encoder(cfg), num_classes=8, drop_path=0.1).eval()
    images = torch.randn(2, 1, 64, 64)
    assert model(images).shape == (2, 8) and model.features(images).shape == (2, 192)
    assert isinstance(model.encoder.norm, torch.nn.Identity)  # the released classifier drops the final norm
    assert model.encoder.blocks[-1].drop_path_rate == pytest.approx(0.1)
    weight = model.head.fc.weight
    assert 1.8e-5 < weight.std() < 2.2e-5 and abs(weight.mean()) < 3e-6 and torch.all(model.head.fc.bias == 0)
    # by hand: run the blocks, average the patch tokens, LayerNorm, Linear
    x = model.encoder.patch_embed(images) + model.encoder.pos_embed[:, 1:]
    x = torch.cat([(model.encoder.cls_token + model.encoder.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
    for block in model.encoder.blocks:
        x = block(x)
    pooled = torch.nn.functional.layer_norm(x[:, 1:].mean(1), (192,), model.head.norm.weight, model.head.norm.bias,
                                            eps=1e-6)
    assert torch.allclose(model(images), pooled @ weight.T + model.head.fc.bias, atol=1e-6)


def test_a_train_py_checkpoint_encoder_loads_exactly(tmp_path):
    model = write_train_checkpoint(tmp_path / "checkpoint.pt")
    loaded, _ = load(tmp_path / "checkpoint.pt")
    encoder, cfg = loaded.image_encoder, loaded.cfg
    assert cfg == model.cfg
    images = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        expected, _, _ = model.image_encoder(images)
        tokens, _, _ = encoder.eval()(images)
    assert torch.equal(tokens, expected)  # the same tokens as in the pretraining model, bit for bit


# -- label subsets -------------------------------------------------------------------------------------------

def test_label_subsets_are_deterministic_nested_and_of_size_ceil_fraction_times_n():
    subsets = {f: ft.label_subset(5116, f, seed=0) for f in (0.01, 0.1, 1.0)}
    assert [len(s) for s in subsets.values()] == [52, 512, 5116]  # ceil(51.16), ceil(511.6)
    assert np.array_equal(subsets[0.01], subsets[0.1][:52]) and np.array_equal(subsets[0.1], subsets[1.0][:512])
    assert sorted(subsets[1.0]) == list(range(5116))
    assert np.array_equal(ft.label_subset(5116, 0.1, seed=0), subsets[0.1])
    assert not np.array_equal(ft.label_subset(5116, 0.1, seed=1), subsets[0.1])
    assert len(ft.label_subset(500, 0.1, 0)) == 50 and len(ft.label_subset(3, 0.01, 0)) == 1


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_a_label_fraction_outside_zero_one_is_refused(fraction, capsys):
    with pytest.raises(ValueError, match="outside"):
        ft.label_subset(100, fraction, 0)
    assert "--label-fraction" in error_of(["--recipe", "synthetic-1", "--label-fraction", str(fraction)], capsys)


# -- the released split files ---------------------------------------------------------------------------------

NIH_LINES = ["00000001_000.png 0 1 0 0 0 0 0 0 0 0 0 0 0 0", "00000001_001.png 0 1 0 0 0 0 0 0 0 0 1 0 0 0",
             "00007816_000.png 0 0 0 0 0 0 0 0 0 0 0 0 0 0", "00023313_002.png 0 0 1 0 0 0 0 1 0 0 0 0 1 0"]


def nih_splits(root, split_dir):
    """An NIH root (Data_Entry, images/) and DatasetsSplits/NIH_ChestX-ray as released (docs/datasets.md §2.5):
    train_list, val_list, test_list CRLF without a final newline; train_1, train_10 LF."""
    make_nih(root, maco_lists=True)
    folder = split_dir / "NIH_ChestX-ray"
    for name, lines in [("train_list", NIH_LINES), ("val_list", NIH_LINES[2:]), ("test_list", NIH_LINES[1:])]:
        write_text(folder / f"{name}.txt", "\n".join(lines), newline="\r\n")
    write_text(folder / "train_1.txt", NIH_LINES[3] + "\n")
    write_text(folder / "train_10.txt", "\n".join(NIH_LINES[1:3]) + "\n")


def test_split_reader_reads_every_released_format(tmp_path):
    nih_splits(tmp_path / "nih", tmp_path / "splits")
    rows = eval_datasets.read_split_file(tmp_path / "splits/NIH_ChestX-ray/train_list.txt", 14)
    assert [name for name, _ in rows] == [line.split()[0] for line in NIH_LINES]
    assert rows[3][1].tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0] and rows[3][1].dtype == np.float32
    rsna = write_text(tmp_path / "rsna.txt", "stage_2_train_images/0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm 0 \n"
                      "stage_2_test_images/2d29c5d7-cd1e-4fb7-896b-c55b69ca6c96.dcm 1 \n")  # trailing spaces
    assert [(name[-9:], labels.tolist()) for name, labels in eval_datasets.read_split_file(rsna, 1)] == [
        ("bddd6.dcm", [0.0]), ("a6c96.dcm", [1.0])]
    siim = write_text(tmp_path / "siim.txt", f"{SIIM_POSITIVE}\n{SIIM_NEGATIVE}")  # ids only
    assert [(n, l.shape) for n, l in eval_datasets.read_split_file(siim, 0)] == [(SIIM_POSITIVE, (0,)), (SIIM_NEGATIVE, (0,))]
    chexpert = write_text(tmp_path / "chexpert.txt",
                          "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg 0 1 0 0 0\n")
    assert eval_datasets.read_split_file(chexpert, 5)[0][1].tolist() == [0, 1, 0, 0, 0]


def test_each_set_loads_its_split_files_through_its_loader(tmp_path):
    nih_splits(tmp_path / "nih", tmp_path / "splits")
    items = eval_datasets.load_split("nih", tmp_path / "nih", tmp_path / "splits", "train_10")
    assert [item.labels.tolist()[10] for item in items] == [1.0, 0.0]  # the list's labels, not the CSV's
    assert items[0].path.endswith("images/00000001_001.png")

    make_rsna(tmp_path / "rsna")
    write_text(tmp_path / "splits/RSNA_Pneumonia/val_list.txt",
               "stage_2_train_images/0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm 0 \n"
               "stage_2_train_images/00436515-870c-4b36-a041-de91049b9ab4.dcm 1 \n")
    items = eval_datasets.load_split("rsna", tmp_path / "rsna", tmp_path / "splits", "val_list")
    assert [item.labels.tolist() for item in items] == [[0.0], [1.0]] and items[1].path.endswith(".png")

    make_siim(tmp_path / "siim")
    write_text(tmp_path / "splits/SIIM-ACR_Pneumothorax/test_list.txt", f"{SIIM_NEGATIVE}\n{SIIM_TWO_REGIONS}\n")
    items = eval_datasets.load_split("siim", tmp_path / "siim", tmp_path / "splits", "test_list")
    assert [item.labels.tolist() for item in items] == [[0.0], [1.0]]  # from train-rle.csv

    make_chexpert(tmp_path / "chexpert")
    write_text(tmp_path / "splits/CheXpert/train_1.txt",
               "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg 1 0 0 1 1\n"
               "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg 0 1 0 0 0\n")
    for root in (tmp_path / "chexpert", tmp_path / "chexpert/CheXpert-v1.0-small"):  # its parent or itself
        items = eval_datasets.load_split("chexpert", root, tmp_path / "splits/CheXpert", "train_1")
        assert [item.labels.tolist() for item in items] == [[1, 0, 0, 1, 1], [0, 1, 0, 0, 0]]
        assert items[1].path.endswith("valid/patient64541/study1/view1_frontal.jpg")


def test_label_fractions_pick_the_released_train_files_or_subsample_train_list(tmp_path, capsys):
    nih_splits(tmp_path / "nih", tmp_path / "splits")
    common = dict(root=str(tmp_path / "nih"), split_dir=str(tmp_path / "splits"))
    names = lambda items: [item.path.rsplit("/", 1)[1] for item in items]
    data = ft.load_data(ft.resolve(ft.FinetuneConfig(recipe="nih-1", **common))[0])
    assert names(data["train"]) == ["00023313_002.png"] and len(data["val"]) == 2 and len(data["test"]) == 3
    assert data["train_positives"]["Effusion"] == 1 and data["class_names"][-1] == "Hernia"
    # one training image: every class is named as never or always present (it is said, not hidden)
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: in the 1"))
    assert "Atelectasis, Cardiomegaly, Effusion" in warning and "Hernia never (or always) occur" in warning
    assert len(ft.load_data(ft.resolve(ft.FinetuneConfig(recipe="nih-10", **common))[0])["train"]) == 2
    half = ft.load_data(ft.resolve(ft.FinetuneConfig(recipe="nih-100", label_fraction=0.5, **common))[0])["train"]
    order = ft.label_subset(4, 0.5, 0)
    assert names(half) == [NIH_LINES[i].split()[0] for i in order]


def test_missing_and_empty_split_files_are_clear_errors(tmp_path):
    nih_splits(tmp_path / "nih", tmp_path / "splits")
    (tmp_path / "splits/NIH_ChestX-ray/val_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val_list.txt not found"):
        eval_datasets.load_split("nih", tmp_path / "nih", tmp_path / "splits", "val_list")
    write_text(tmp_path / "splits/NIH_ChestX-ray/val_list.txt", "\r\n  \r\n")
    with pytest.raises(ValueError, match="is empty"):
        eval_datasets.load_split("nih", tmp_path / "nih", tmp_path / "splits", "val_list")


def test_a_split_file_of_another_class_count_is_refused(tmp_path):
    nih_splits(tmp_path / "nih", tmp_path / "splits")
    write_text(tmp_path / "splits/NIH_ChestX-ray/train_1.txt", "00000001_000.png 0 1 0 0 0\n")  # CheXpert's 5
    with pytest.raises(ValueError, match="line 1: 5 labels after the image, expected 14"):
        eval_datasets.load_split("nih", tmp_path / "nih", tmp_path / "splits", "train_1")


# -- schedule and loss ----------------------------------------------------------------------------------------

def test_learning_rate_warms_up_linearly_then_follows_a_half_cosine_to_zero():
    values = [ft.finetune_lr(step, 0.1, warmup_steps=4, total_steps=12) for step in (1, 2, 4, 8, 12)]
    # warm-up 0.1 * step / 4; then 0.1 * (1 + cos(pi * (step - 4) / 8)) / 2
    assert values == pytest.approx([0.025, 0.05, 0.1, 0.05, 0.0])
    assert ft.finetune_lr(6, 0.1, 4, 12) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_bce_loss_is_the_mean_over_known_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    by_hand = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(-3.0))) / 3
    assert ft.bce_loss(logits, labels).item() == pytest.approx(by_hand)


# -- bad input ------------------------------------------------------------------------------------------------

def test_a_missing_default_checkpoint_says_to_run_train_py(synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/maco/checkpoint.pt here
    message = error_of(["--root", str(synthetic_root), "--out-dir", "out"], capsys)
    assert "no checkpoint at runs/maco/checkpoint.pt: run `python train.py` first" in message


def test_a_checkpoint_of_another_preset_than_the_data_needs_is_refused(tmp_path, capsys):
    write_train_checkpoint(tmp_path / "tiny.pt")
    message = error_of(["--recipe", "nih-1", "--root", str(tmp_path), "--split-dir", str(tmp_path), "--ckpt",
                        str(tmp_path / "tiny.pt"), "--out-dir", str(tmp_path / "out")], capsys)
    assert "tiny model for 64-pixel images" in message and "fine-tunes at 224 pixels" in message
    write_train_checkpoint(tmp_path / "small.pt", img_size=32)
    message = error_of(["--root", str(tmp_path), "--ckpt", str(tmp_path / "small.pt"), "--out-dir",
                        str(tmp_path / "out")], capsys)
    assert "custom model for 32-pixel images" in message and "--img-size 32" in message


def test_a_class_count_that_does_not_match_the_data_is_refused(synthetic_root, tmp_path, capsys):
    message = error_of(["--root", str(synthetic_root), "--scratch", "--num-classes", "14", "--out-dir",
                        str(tmp_path)], capsys)
    assert "--num-classes 14 does not match the data: synthetic has 8 classes" in message


def test_a_fine_tuned_checkpoint_whose_head_has_another_class_count_is_refused(synthetic_root, tmp_path, capsys):
    cfg = MaCoConfig.preset("tiny")
    model = ft.Classifier(ft.new_encoder(cfg), num_classes=5)  # e.g. fine-tuned on CheXpert
    torch.save({"classifier": model.state_dict(), "model_config": dataclasses.asdict(cfg),
                "class_names": ["a", "b", "c", "d", "e"]}, tmp_path / "best.pt")
    message = error_of(["--recipe", "synthetic-1", "--root", str(synthetic_root), "--ckpt", str(tmp_path / "best.pt"),
                        "--no-scratch", "--out-dir", str(tmp_path / "out")], capsys)
    assert "has a head for 5 classes; synthetic-1 has 8" in message


def test_contradicting_initialisations_are_refused(capsys):
    assert "not both" in error_of(["--ckpt", "a.pt", "--init", "b.pth"], capsys)
    assert "drop --ckpt" in error_of(["--scratch", "--ckpt", "a.pt"], capsys)
    assert "needs --split-dir" in error_of(["--recipe", "rsna-10", "--root", "x", "--scratch"], capsys)


# -- end to end -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_short_fine_tune_lowers_the_loss_and_its_best_weights_reload_exactly(synthetic_root, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--recipe", "synthetic-100", "--root", str(synthetic_root), "--workers", "0", "--batch-size", "16",
              "--n-boot", "50", "--figure", str(tmp_path / "figure.png")]
    assert ft.main(common + ["--scratch", "--no-linear-probe", "--no-probe-head", "--steps", "40",
                             "--warmup-steps", "4",
                             "--eval-interval", "10", "--out-dir", str(out)]) == 0
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert run["init"] == "scratch" and run["mode"] == "finetune" and run["train_images"] > 100
    assert run["last_loss"] < 0.8 * run["first_loss"], (run["first_loss"], run["last_loss"])
    assert set(run["validations"]) == {"0", "10", "20", "30", "40"}
    assert (tmp_path / "figure.png").stat().st_size > 0 and "synthetic 100%" in capsys.readouterr().out
    # the saved best weights, evaluated without training, give the same test predictions
    best = out / "synthetic-100" / "scratch-finetune" / "best.pt"
    assert ft.main(common + ["--ckpt", str(best), "--no-scratch", "--no-linear-probe", "--steps", "0",
                             "--out-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["runs"][0]
    assert again["init"] == "finetuned"
    assert again["test"]["macro_auc"] == pytest.approx(run["test"]["macro_auc"], abs=1e-6)


@pytest.mark.slow
def test_the_linear_probe_trains_the_head_only_on_features_computed_once(synthetic_root, tmp_path, monkeypatch):
    calls = []
    features = ft.Classifier.features
    monkeypatch.setattr(ft.Classifier, "features", lambda self, images: calls.append(len(images)) or features(self, images))
    write_train_checkpoint(tmp_path / "tiny.pt")
    assert ft.main(["--recipe", "synthetic", "--root", str(synthetic_root), "--ckpt", str(tmp_path / "tiny.pt"),
                    "--no-scratch", "--linear-probe", "--workers", "0", "--probe-steps", "30", "--n-boot", "20",
                    "--out-dir", str(tmp_path / "out"), "--figure", str(tmp_path / "figure.png")]) == 0
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["label_fraction"] for r in summary["runs"]] == [0.01, 0.1, 1.0]
    assert [r["mode"] for r in summary["runs"]] == ["linear-probe"] * 3
    splits = {split: len(ft.eval_datasets.load_synthetic(synthetic_root, None, split))
              for split in ("train", "validate", "test")}
    assert sum(calls) == sum(splits.values())  # every image encoded exactly once for the three fractions
    best = torch.load(summary["runs"][0]["weights"], weights_only=True)
    source = torch.load(tmp_path / "tiny.pt", weights_only=True)["model"]
    assert torch.equal(best["classifier"]["encoder.blocks.0.attn.qkv.weight"],
                       source["image_encoder.blocks.0.attn.qkv.weight"])  # the encoder stayed frozen


@pytest.mark.slow
def test_fine_tuning_from_the_probe_head_starts_where_the_probe_ended(synthetic_root, tmp_path):
    write_train_checkpoint(tmp_path / "tiny.pt")
    assert ft.main(["--recipe", "synthetic-10", "--root", str(synthetic_root), "--ckpt", str(tmp_path / "tiny.pt"),
                    "--no-scratch", "--probe-head", "--workers", "0", "--probe-steps", "30", "--steps", "4",
                    "--eval-interval", "2", "--batch-size", "16", "--n-boot", "20", "--precision", "fp32",
                    "--out-dir", str(tmp_path / "out"), "--figure", str(tmp_path / "figure.png")]) == 0
    probe, finetuned = json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"]
    assert (probe["mode"], finetuned["mode"]) == ("linear-probe", "finetune")
    # step 0 of fine-tuning is the frozen encoder with the probe's best head: the probe's validation AUC
    assert finetuned["validations"]["0"] == pytest.approx(probe["val_macro_auc"], abs=1e-5)
    assert finetuned["val_macro_auc"] >= probe["val_macro_auc"] - 1e-5
