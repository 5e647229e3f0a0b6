"""The text side's warm start (tools/warm_start.py): BERT's corruption rule and a run that learns words."""

import torch

from maco import load
from tools import warm_start
from util.tokenizer import PAD_ID


def test_masking_chooses_word_tokens_only_at_the_rate_asked_and_corrupts_them_80_10_10():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 500, (400, 50), generator=generator)
    input_ids[:, 0] = 2  # [CLS]
    input_ids[:, 40:] = PAD_ID
    attention_mask = (input_ids != PAD_ID).long()
    inputs, labels = warm_start.mask_words(input_ids, attention_mask, 500, 0.15, generator)
    chosen = labels >= 0
    assert not chosen[:, 0].any() and not chosen[:, 40:].any()  # never [CLS] or padding
    assert torch.equal(labels[chosen], input_ids[chosen]) and (labels[~chosen] == -100).all()
    assert abs(chosen.float().sum() / (400 * 39) - 0.15) < 0.01
    masked = (inputs[chosen] == warm_start.MASK_ID).float().mean()
    kept = (inputs[chosen] == input_ids[chosen]).float().mean()
    assert abs(masked - 0.8) < 0.02 and 0.08 < kept < 0.12  # 10% kept (a random word may also equal it)
    assert torch.equal(inputs[~chosen], input_ids[~chosen])


def test_a_short_warm_start_learns_words_and_writes_a_checkpoint_train_can_start_from(synthetic_root, tmp_path):
    out = tmp_path / "warm" / "checkpoint.pt"
    summary = warm_start.warm_start(warm_start.WarmStartConfig(root=str(synthetic_root), out=str(out), epochs=12,
                                                               batch_size=16, lr=2e-3))
    history = summary["history"]  # (on the default world the loss plateaus near 4 for ~200 steps, then falls to ~1.5)
    last = history[-3:]
    assert sum(h["loss"] for h in last) / 3 < 0.9 * history[0]["loss"], history
    assert sum(h["accuracy"] for h in last) / 3 > history[0]["accuracy"], history
    model, tokenizer = load(out)
    untouched = torch.load(out, weights_only=True)["model"]
    assert set(untouched) == set(model.state_dict())  # the MLM head is not part of the model


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert warm_start.main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "w.pt")]) == 2
    assert "--root" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()  # nothing generated
    assert warm_start.main(["--mask-prob", "1.5"]) == 2
    assert "--mask-prob" in capsys.readouterr().err
