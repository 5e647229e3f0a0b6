"""released.py: the released MaCo weights, without the real file.

The released layout (key names and shapes, from released `model_MaCo.py`, `bert/bert_encoder.py` and Hugging Face's
BERT) is written out below from a MaCoConfig; at `base` it is maco.pth's, checked on meta tensors (no memory), and
at `tiny` it is filled with random values and saved the way the released code saves (an argparse.Namespace under
"args"), then loaded through every entry point.
"""

import argparse
import dataclasses
import json
import os

import pytest
import torch

import maco
import train
from eval_zeroshot import EvalConfig, run_evaluation
from maco import MaCo, MaCoConfig
from util import released
from util.cli import parse_config
from util.tokenizer import save_tokenizer, train_tokenizer

BERT = "bert_encoder.model.bert."
# the 14 keys of maco.pth the loader must leave out: 1 + 7 + 2 + 2 + 1 + 1
DROPPED = ["logit_scale", "pos_weight_text.weight", "pos_weight_text.bias", "pos_cat.weight", "pos_cat.bias",
           "WCE.weight", BERT + "embeddings.position_ids"] + [
    "bert_encoder.model.cls.predictions." + name for name in
    ("bias", "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
     "transform.LayerNorm.bias", "decoder.weight", "decoder.bias")]
VIT_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
TEXT_LAYER = {"attention.self.query": "attention.query", "attention.self.key": "attention.key",
              "attention.self.value": "attention.value", "attention.output.dense": "attention_output",
              "attention.output.LayerNorm": "attention_norm", "intermediate.dense": "intermediate",
              "output.dense": "output", "output.LayerNorm": "output_norm"}


def released_layout(cfg: MaCoConfig, contrastive_batch: int = 2048) -> dict[str, tuple]:
    """Every key of a state dict saved by the released code, with its shape, for the model `cfg` describes."""
    D, Dd, W, E, N, V = cfg.width, cfg.decoder_width, cfg.text_width, cfg.embed_dim, cfg.num_patches, cfg.vocab_size
    shapes = {"patch_embed.proj.weight": (D, cfg.in_chans, cfg.patch_size, cfg.patch_size), "patch_embed.proj.bias": (D,),
              "cls_token": (1, 1, D), "pos_embed": (1, N + 1, D), "norm.weight": (D,), "norm.bias": (D,),
              "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,), "mask_token": (1, 1, Dd),
              "decoder_pos_embed": (1, N + 1, Dd), "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
              "decoder_pred.weight": (cfg.target_patch_size ** 2 * cfg.in_chans, Dd),
              "decoder_pred.bias": (cfg.target_patch_size ** 2 * cfg.in_chans,), "logit_scale": ()}
    for prefix, depth, width in (("blocks", cfg.depth, D), ("decoder_blocks", cfg.decoder_depth, Dd)):
        hidden = int(width * cfg.mlp_ratio)
        for i in range(depth):
            block = {"norm1": (width,), "attn.qkv": (3 * width, width), "attn.proj": (width, width), "norm2": (width,),
                     "mlp.fc1": (hidden, width), "mlp.fc2": (width, hidden)}
            for part, weight in block.items():
                shapes[f"{prefix}.{i}.{part}.weight"], shapes[f"{prefix}.{i}.{part}.bias"] = weight, weight[:1]
    shapes.update({BERT + "embeddings.word_embeddings.weight": (V, W),
                   BERT + "embeddings.position_embeddings.weight": (cfg.max_len, W),
                   BERT + "embeddings.token_type_embeddings.weight": (2, W),
                   BERT + "embeddings.LayerNorm.weight": (W,), BERT + "embeddings.LayerNorm.bias": (W,),
                   BERT + "embeddings.position_ids": (1, cfg.max_len)})
    for i in range(cfg.text_depth):
        F = cfg.text_ffn_width
        layer = {"attention.self.query": (W, W), "attention.self.key": (W, W), "attention.self.value": (W, W),
                 "attention.output.dense": (W, W), "attention.output.LayerNorm": (W,), "intermediate.dense": (F, W),
                 "output.dense": (W, F), "output.LayerNorm": (W,)}
        for part, weight in layer.items():
            key = f"{BERT}encoder.layer.{i}.{part}"
            shapes[key + ".weight"], shapes[key + ".bias"] = weight, weight[:1]
    mlm = "bert_encoder.model.cls.predictions."
    shapes.update({BERT + "pooler.dense.weight": (E, W), BERT + "pooler.dense.bias": (E,),  # 384 -> 768 in maco.pth
                   mlm + "bias": (V,), mlm + "transform.dense.weight": (W, W), mlm + "transform.dense.bias": (W,),
                   mlm + "transform.LayerNorm.weight": (W,), mlm + "transform.LayerNorm.bias": (W,),
                   mlm + "decoder.weight": (V, W), mlm + "decoder.bias": (V,),
                   "img_mlp.weight": (E, D), "img_mlp.bias": (E,), "pos_weight_img.weight": (1, N),
                   "pos_weight_img.bias": (1,), "pos_weight_text.weight": (1, E), "pos_weight_text.bias": (1,),
                   "pos_cat.weight": (1, 2), "pos_cat.bias": (1,), "Tpar": (), "WCE.weight": (contrastive_batch,)})
    return shapes


def expected_names(cfg: MaCoConfig) -> dict[str, str]:
    """Released key -> this project's, written out module by module (the table in released.py's docstring)."""
    names = {key: "image_encoder." + key for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token",
                                                     "pos_embed", "norm.weight", "norm.bias")}
    names.update({key: key for key in ("decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
                                       "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight",
                                       "decoder_pred.bias")})
    for end in ("weight", "bias"):
        names.update({f"blocks.{i}.{part}.{end}": f"image_encoder.blocks.{i}.{part}.{end}"
                      for i in range(cfg.depth) for part in VIT_BLOCK})
        names.update({f"decoder_blocks.{i}.{part}.{end}": f"decoder_blocks.{i}.{part}.{end}"
                      for i in range(cfg.decoder_depth) for part in VIT_BLOCK})
        names.update({f"{BERT}encoder.layer.{i}.{part}.{end}": f"text_encoder.layers.{i}.{ours}.{end}"
                      for i in range(cfg.text_depth) for part, ours in TEXT_LAYER.items()})
        names.update({f"{BERT}embeddings.LayerNorm.{end}": f"text_encoder.embeddings.LayerNorm.{end}",
                      f"{BERT}pooler.dense.{end}": f"text_encoder.pooler.{end}",
                      f"img_mlp.{end}": f"image_proj.{end}", f"pos_weight_img.{end}": f"correlation_head.{end}"})
    for table in ("word", "position", "token_type"):
        names[f"{BERT}embeddings.{table}_embeddings.weight"] = f"text_encoder.embeddings.{table}_embeddings.weight"
    names["Tpar"] = "logit_scale"
    return names


def random_state(layout: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=generator) for key, shape in layout.items()}
    state[BERT + "embeddings.position_ids"] = torch.arange(layout[BERT + "embeddings.position_ids"][1])[None]
    state["Tpar"] = torch.tensor(20.0)  # below the clamp at 100, so the forward uses it as it is
    return state


def save_released(path, state):
    """As the released code saves (MAE's save_model): the command line rides along as an argparse.Namespace."""
    args = argparse.Namespace(model="MaCo", SR=1.0, mask_ratio=0.5, batch_size=512, lr=None, blr=1.5e-4,
                              output_dir="./output_dir", distributed=True)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 50,
                "scaler": {"scale": 65536.0}, "args": args}, path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model's weights in the released layout, saved as the released code does, and a tokenizer file."""
    folder = tmp_path_factory.mktemp("released")
    tokenizer = train_tokenizer(["There is a small left pleural effusion.", "No pneumothorax. The lung is clear.",
                                 "Mild cardiomegaly with pulmonary edema; right lower lobe opacity."], vocab_size=120)
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    cfg = MaCoConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size())
    state = random_state(released_layout(cfg, contrastive_batch=32))
    save_released(folder / "maco.pth", state)
    return dict(folder=folder, cfg=cfg, state=state, tokenizer=tokenizer, path=folder / "maco.pth",
                tokenizer_path=folder / "tokenizer.json")


def direct_model(cfg, state):
    """A model built directly from the released tensors, through expected_names (not through released.py)."""
    model = MaCo(cfg)
    model.load_state_dict({ours: state[key] for key, ours in expected_names(cfg).items()}, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# The base layout: maco.pth's names and shapes

def test_base_layout_maps_314_keys_and_drops_exactly_14():
    cfg = MaCoConfig.preset("base")
    layout = released_layout(cfg)
    # maco.pth's shapes, as the released code and issue SZUHvern/MaCo#4 give them
    assert layout[BERT + "pooler.dense.weight"] == (768, 384)
    assert layout["pos_embed"] == layout["decoder_pos_embed"] == (1, 197, 768)
    assert layout["decoder_pred.weight"] == (3072, 768) and layout["pos_weight_img.weight"] == (1, 196)
    assert layout[BERT + "embeddings.word_embeddings.weight"] == (30000, 384) and layout["img_mlp.weight"] == (768, 768)
    assert len(layout) == 314 + 14
    state = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    assert maco._released_config(state) == cfg
    with torch.device("meta"):
        model = MaCo(cfg)
    report = released.match(model, state, "maco.pth")
    assert report.loaded == expected_names(cfg) and len(report.loaded) == 314
    assert sorted(report.dropped) == sorted(DROPPED)
    assert "loaded 314" in str(report) and "dropped 14" in str(report)
    assert "bert_encoder.model.cls.predictions.* (7)" in str(report)
    # the super-resolution target is read from decoder_pred: 768 = 16 x 16 x 3 values per patch without it
    state["decoder_pred.weight"], state["decoder_pred.bias"] = torch.empty(768, 768, device="meta"), torch.empty(768, device="meta")
    assert maco._released_config(state) == MaCoConfig.preset("base", super_resolution=False)
    state["decoder_pred.weight"] = torch.empty(1000, 768, device="meta")
    with pytest.raises(ValueError, match=r"decoder_pred.weight: file \(1000, 768\) vs model \(3072, 768\) \(with .*"
                                         r"or \(768, 768\) \(without"):
        maco._released_config(state)


# ----------------------------------------------------------------------------------------------------------
# Loading a file

def test_every_loaded_tensor_is_its_source_and_the_dropped_ones_are_reported(tiny, capsys):
    model, tokenizer = maco.load(tiny["path"], tiny["tokenizer_path"])
    assert not model.training and model.cfg == tiny["cfg"]
    assert tokenizer.get_vocab() == tiny["tokenizer"].get_vocab()
    own = model.state_dict()
    for key, ours in expected_names(tiny["cfg"]).items():
        assert torch.equal(own[ours], tiny["state"][key]), key
    # the position tables are the file's (random here), not recomputed; the temperature is Tpar, not logit_scale
    assert not torch.equal(own["image_encoder.pos_embed"], MaCo(tiny["cfg"]).image_encoder.pos_embed)
    assert model.logit_scale.item() == 20.0
    printed = capsys.readouterr().out
    assert "dropped 14" in printed and "WCE.weight" in printed and "logit_scale" in printed
    assert "above the clamp" not in printed


def test_a_temperature_above_the_clamp_is_noted(tiny, tmp_path, capsys):
    save_released(tmp_path / "hot.pth", {**tiny["state"], "Tpar": torch.tensor(150.0)})
    model, _ = maco.load(tmp_path / "hot.pth", tiny["tokenizer_path"])
    assert model.logit_scale.item() == 150.0  # loaded as it is; the forward clamps it (D4)
    assert "Tpar = 150.00 is above the clamp at 100" in capsys.readouterr().out


def test_the_embeddings_are_those_of_a_model_built_directly_from_the_same_tensors(tiny):
    model, tokenizer = maco.load(tiny["path"], tiny["tokenizer"], verbose=False)
    reference = direct_model(tiny["cfg"], tiny["state"])
    images = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(4, tokenizer.get_vocab_size(), (3, 9), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        for a, b in zip(model.encode_image(images), reference.encode_image(images)):
            assert torch.equal(a, b)
        assert torch.equal(model.encode_text(ids, mask), reference.encode_text(ids, mask))
        assert torch.equal(model.spatial_prior(), reference.spatial_prior())
        big = torch.randn(3, 1, 128, 128, generator=torch.Generator().manual_seed(3))  # super-resolution input
        out, ref = (m(big, ids, mask, generator=torch.Generator().manual_seed(4)) for m in (model, reference))
    for key in ("loss", "loss_rec", "loss_con", "correlation_weights", "pred"):
        assert torch.equal(out[key], ref[key]), key


def test_a_bare_state_dict_loads_too(tiny, tmp_path):
    torch.save(tiny["state"], tmp_path / "bare.pth")
    model, _ = maco.load(tmp_path / "bare.pth", tiny["tokenizer_path"])
    assert torch.equal(model.text_encoder.pooler.weight, tiny["state"][BERT + "pooler.dense.weight"])


def test_a_file_without_the_super_resolution_target_gives_a_model_without_it(tiny, tmp_path):
    state = dict(tiny["state"])
    state["decoder_pred.weight"], state["decoder_pred.bias"] = torch.randn(64, 128), torch.randn(64)  # 8 x 8 x 1
    save_released(tmp_path / "no_sr.pth", state)
    model, _ = maco.load(tmp_path / "no_sr.pth", tiny["tokenizer"], verbose=False)
    assert model.cfg.super_resolution is False and model.cfg.input_size == 64


# ----------------------------------------------------------------------------------------------------------
# Clear errors

@pytest.mark.parametrize("side", ["text", "embed"])
def test_the_square_pooler_of_the_released_code_is_explained(tiny, tmp_path, side):
    width = tiny["cfg"].text_width if side == "text" else tiny["cfg"].embed_dim  # 384 x 384 or 768 x 768 at base
    state = dict(tiny["state"])
    state[BERT + "pooler.dense.weight"], state[BERT + "pooler.dense.bias"] = torch.randn(width, width), torch.randn(width)
    save_released(tmp_path / "square.pth", state)
    with pytest.raises(ValueError) as error:
        maco.load(tmp_path / "square.pth", tiny["tokenizer"], verbose=False)
    message = str(error.value)
    assert f"{BERT}pooler.dense.weight -> text_encoder.pooler.weight: file ({width}, {width}) vs model (192, 128)" in message
    assert "SZUHvern/MaCo#4" in message and "128 -> 192 pooler" in message


def test_a_wrong_shape_an_unknown_key_and_a_missing_key_are_each_named(tiny, tmp_path):
    state = dict(tiny["state"])
    state["blocks.1.attn.qkv.weight"] = torch.randn(3 * 192, 100)
    state["text_head.weight"] = torch.randn(3)
    del state[BERT + "encoder.layer.1.output.LayerNorm.bias"]
    save_released(tmp_path / "bad.pth", state)
    with pytest.raises(ValueError) as error:
        maco.load(tmp_path / "bad.pth", tiny["tokenizer_path"])
    message = str(error.value)
    assert "(3 problem(s))" in message
    assert "blocks.1.attn.qkv.weight -> image_encoder.blocks.1.attn.qkv.weight: file (576, 100) vs model (576, 192)" in message
    assert "text_head.weight: a key this loader does not know" in message
    assert "text_encoder.layers.1.output_norm.bias: the file has no tensor for it" in message


def test_a_tokenizer_that_does_not_fit_the_word_embeddings_is_an_error(tiny, tmp_path):
    other = train_tokenizer(["a quite different vocabulary of words"], vocab_size=60)
    with pytest.raises(ValueError, match=r"word_embeddings.weight: file \(\d+, 128\) vs model \(\d+, 128\)"):
        maco.load(tiny["path"], other, verbose=False)


class WritesAFile:
    """An object whose unpickling would create a file: the proof that no code from the file runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_a_file_pickling_anything_but_plain_data_and_a_namespace_is_refused(tiny, tmp_path):
    marker = tmp_path / "was_run"
    torch.save({"model": tiny["state"], "args": argparse.Namespace(SR=1.0), "hook": WritesAFile(marker)},
               tmp_path / "evil.pth")
    for load in (lambda: maco.load(tmp_path / "evil.pth", tiny["tokenizer_path"]),
                 lambda: maco.load(tmp_path / "evil.pth", tiny["tokenizer_path"])):
        with pytest.raises(ValueError, match=r"refused: the file pickles \S*makedirs, which is not plain data"):
            load()
    assert not marker.exists()


def test_load_tells_the_kinds_of_file_apart(tiny, tmp_path):
    with pytest.raises(ValueError, match="pass the released mimic_wordpiece.json"):
        maco.load(tiny["path"])
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}}, tmp_path / "mae.pth")
    with pytest.raises(ValueError, match="neither a train.py checkpoint .* nor the released MaCo weights.*into=model"):
        maco.load(tmp_path / "mae.pth", tiny["tokenizer_path"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        maco.load(tmp_path / "missing.pth", tiny["tokenizer_path"])


# ----------------------------------------------------------------------------------------------------------
# Every entry point takes either kind of file

def test_evaluation_of_the_released_file_equals_that_of_the_same_weights_as_a_train_checkpoint(tiny, synthetic_root, tmp_path):
    model = direct_model(tiny["cfg"], tiny["state"])
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(tiny["cfg"]),
                "tokenizer": tiny["tokenizer"].to_str()}, tmp_path / "train.pt")
    common = dict(data="synthetic", root=str(synthetic_root), max_images=24, n_boot=20, overlays=0, device="cpu")
    ours = run_evaluation(EvalConfig(ckpt=str(tmp_path / "train.pt"), out=str(tmp_path / "a"), **common))
    theirs = run_evaluation(EvalConfig(ckpt=str(tiny["path"]), tokenizer=str(tiny["tokenizer_path"]),
                                       out=str(tmp_path / "b"), **common))
    assert theirs["zero_shot"]["n_images"] > 0 and theirs["grounding"]["n_pairs"] > 0
    for task in ("zero_shot", "grounding"):  # as JSON text, so that a NaN (a class without positives) compares equal
        assert json.dumps(ours[task], sort_keys=True) == json.dumps(theirs[task], sort_keys=True)
    with pytest.raises(ValueError, match="has another vocabulary"):  # a train.py file keeps its own tokenizer
        maco.load(tmp_path / "train.pt", train_tokenizer(["other words"], vocab_size=40))


def train_args(root, out, *extra):
    return ["--root", str(root), "--out-dir", str(out), "--batch-size", "8", "--num-workers", "0", "--no-eval",
            "--epochs", "1", "--stop-after-steps", "1", *extra]


def test_train_init_from_released_weights_loads_the_whole_model_with_a_fresh_schedule(tiny, synthetic_root, tmp_path, capsys):
    result = train.train(parse_config(train.TrainConfig, train_args(
        synthetic_root, tmp_path, "--init", str(tiny["path"]), "--tokenizer", str(tiny["tokenizer_path"]))))
    assert "--init" in capsys.readouterr().out
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["step"] == 1 and checkpoint["train_config"]["init"] == str(tiny["path"])
    # the fixed tables are buffers, untouched by the optimizer step: still the file's random ones
    assert torch.equal(checkpoint["model"]["image_encoder.pos_embed"], tiny["state"]["pos_embed"])
    assert torch.equal(checkpoint["model"]["decoder_pos_embed"], tiny["state"]["decoder_pos_embed"])
    # the schedule is fresh: its warm-up starts at lr 0, so step 0 leaves every tensor as the file has it
    assert checkpoint["lr"] == train.pretrain_lr(1, checkpoint["steps_per_epoch"], train.resolve(train.TrainConfig()))
    assert all(state["step"] == 1 for state in checkpoint["optimizer"]["state"].values())
    for key, ours in expected_names(tiny["cfg"]).items():
        assert torch.equal(checkpoint["model"][ours], tiny["state"][key]), key


@pytest.mark.parametrize("extra, message", [
    (["--init", "{released}"], "(--tokenizer mimic_wordpiece.json)"),
    (["--init", "{released}", "--tokenizer", "{tokenizer}", "--width", "96"], "choose the file's preset"),
    (["--init", "{empty}"], "none of its 1 tensors belongs to the image encoder"),
])
def test_bad_init_files_give_clear_errors(tiny, synthetic_root, tmp_path, capsys, extra, message):
    torch.save({"model": {"head.weight": torch.zeros(2)}}, tmp_path / "empty.pth")
    paths = dict(released=tiny["path"], tokenizer=tiny["tokenizer_path"], empty=tmp_path / "empty.pth")
    extra = [arg.format(**paths) for arg in extra]
    assert train.main(train_args(synthetic_root, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err


def test_the_image_encoder_of_the_released_file_is_the_files_own(tiny):
    model, _ = maco.load(tiny["path"], str(tiny["tokenizer_path"]))
    encoder, cfg = model.image_encoder, model.cfg
    direct = direct_model(tiny["cfg"], tiny["state"]).image_encoder
    assert cfg == tiny["cfg"]
    for (name, ours), (_, theirs) in zip(encoder.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    with pytest.raises(ValueError, match="pass the released mimic_wordpiece.json"):
        maco.load(tiny["path"])
