"""Command lines: every flag of every script is checked before any work starts, with a message that names the flag
and its allowed values; configs made in code are checked the same way; --help shows the preset values."""

import dataclasses
import re

import pytest

import data
import eval_zeroshot
import train
from maco import MaCoConfig
from tools import bench
from util.cli import build_parser, given_flags, parse_config
from world import synthetic

BAD_FLAGS = [  # (script's main, argv, the message's key part)
    (train.main, ["--mask-ratio", "1.5"], "--mask-ratio 1.5: must be >= 0 and < 1"),
    (train.main, ["--mask-ratio", "-0.5"], "--mask-ratio -0.5: must be >= 0 and < 1"),
    (train.main, ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (train.main, ["--batch-size", "-1"], "--batch-size -1: must be >= 1"),
    (train.main, ["--accum-steps", "0"], "--accum-steps 0: must be >= 1"),
    (train.main, ["--log-interval", "0"], "--log-interval 0: must be >= 1"),
    (train.main, ["--ckpt-interval", "0"], "--ckpt-interval 0: must be >= 1"),
    (train.main, ["--epochs", "0"], "--epochs 0: must be >= 1"),
    (train.main, ["--lr", "0"], "--lr 0.0: must be > 0"),
    (train.main, ["--lr", "nan"], "--lr nan: must be > 0"),
    (train.main, ["--beta2", "1"], "--beta2 1.0: must be >= 0 and < 1"),
    (train.main, ["--lam", "1.2"], "--lam 1.2: must be >= 0 and <= 1"),
    (train.main, ["--num-workers", "-2"], "--num-workers -2: must be >= 0"),
    (train.main, ["--img-size", "60"], "--img-size 60 must be a multiple of --patch-size"),
    (train.main, ["--width", "100", "--num-heads", "3"], "--width 100 must be a multiple of --num-heads 3"),
    (train.main, ["--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (train.main, ["--batch-size", "many"], "--batch-size: invalid int value: 'many'"),
    (data.main, ["cache", "--size", "0"], "--size 0: must be >= 8"),
    (data.main, ["cache", "--chunk-size", "0"], "--chunk-size 0: must be >= 1"),
    (data.main, ["cache", "--resize", "stretch"], "--resize: invalid choice: 'stretch'"),
    (synthetic.main, ["--studies", "0"], "--studies 0: must be >= 1"),
    (synthetic.main, ["--image-size", "16"], "--image-size 16: must be >= 32"),
    (synthetic.main, ["--workers", "0"], "--workers 0: must be >= 1"),
    (bench.main, ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (bench.main, ["--steps", "0"], "--steps 0: must be >= 1"),
    (bench.main, ["--preset", "small"], "--preset: invalid choice: 'small'"),
    (eval_zeroshot.main, ["--data", "imagenet"], "--data: invalid choice: 'imagenet'"),
    (eval_zeroshot.main, ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (eval_zeroshot.main, ["--n-boot", "0"], "--n-boot 0: must be >= 1"),
    (eval_zeroshot.main, ["--uncertain", "maybe"], "--uncertain: invalid choice: 'maybe'"),
    (eval_zeroshot.main, ["--prompts", "clever"], "--prompts: invalid choice: 'clever'"),
]


@pytest.mark.parametrize("main, argv, message", BAD_FLAGS, ids=[" ".join(row[1]) for row in BAD_FLAGS])
def test_a_bad_flag_value_is_refused_with_its_name_and_range(main, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and if it were, not into the repository
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_configs_made_in_code_are_checked_too():
    with pytest.raises(ValueError, match="--batch-size 0: must be >= 1"):
        train.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="mask_ratio 1.0: must be >= 0 and < 1"):
        MaCoConfig.preset("tiny", mask_ratio=1.0)
    with pytest.raises(ValueError, match=r"unknown model settings \['widht'\]"):
        train.TrainConfig(model={"widht": 3})


def test_every_model_setting_is_a_flag_that_lands_in_the_model_config():
    model_fields = {spec.name for spec in dataclasses.fields(MaCoConfig)}
    parser_flags = {action.dest for action in build_parser(train.TrainConfig)._actions}
    assert model_fields <= parser_flags
    cfg = parse_config(train.TrainConfig, ["--img-size", "96", "--no-correlation-weighting", "--logit-scale-init", "5"])
    assert cfg.model == {"img_size": 96, "correlation_weighting": False, "logit_scale_init": 5.0}
    resolved = MaCoConfig.preset("tiny", **cfg.model)
    assert (resolved.img_size, resolved.correlation_weighting, resolved.patch_size) == (96, False, 8)
    assert given_flags(cfg, ["--img-size", "96", "--lr", "1e-3"]) == {"model", "lr"}


def test_help_shows_the_value_each_preset_gives_a_model_setting(capsys):
    assert train.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    text = text[text.index("model settings (each defaults to the preset's value)"):]  # the options, not the usage
    assert "(preset: base 224, tiny 64)" in text  # --img-size
    for spec in dataclasses.fields(MaCoConfig):
        shown = re.search(rf"--{spec.name.replace('_', '-')}[ ,].*?\(preset: base (\S+), tiny (\S+)\)", text)
        assert shown, spec.name
        assert shown.group(1).rstrip(")") in (str(spec.default), f"{spec.default:.4g}" if isinstance(spec.default, float)
                                             else str(spec.default)), spec.name


def test_an_unwritable_evaluation_output_fails_before_the_model_is_read(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    argv = ["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a_file" / "eval")]
    assert eval_zeroshot.main(argv) == 2
    assert "--out" in (error := capsys.readouterr().err) and "cannot write there" in error and "missing.pt" not in error
