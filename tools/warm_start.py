"""A text side that starts from something: masked report modelling of the training reports, before MaCo trains.

    python -m tools.warm_start --out runs/warm-text/checkpoint.pt            # ~3 CPU minutes on the default world
    python train.py --init runs/warm-text/checkpoint.pt                       # MaCo from that text encoder

MaCo's image encoder starts from MAE's ImageNet weights and its report encoder from a BERT; the `tiny` model starts
both from random weights. This is the text side's warm start (docs/alignment.md): BERT's masked language modelling
(Devlin et al. 2019; MRM, MaCo's parent, trains its report branch with such a loss) on the captions train.py draws
from the same reports (D6: random sentence subsets), with the same tokenizer. 15% of the word tokens are chosen; of
those 80% become [MASK], 10% a random word and 10% stay; a head (Linear, GELU, LayerNorm, then the word embeddings
transposed, tied) predicts the chosen words from the text encoder's last token states. Only the text encoder learns;
the image side keeps the initialisation train.py would give it with the same seed. The output is a train.py
checkpoint (model, model_config, tokenizer), which `train.py --init` loads whole, its tokenizer included.

The image side's warm start needs no code of its own: a first phase of masked-image modelling alone is
`python train.py --lam 1 --epochs 4 --out-dir runs/warm-image`, then
`python train.py --init runs/warm-image/checkpoint.pt`.
"""

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import CAPTION_SOURCES, report_to_caption
from maco import PRESETS, MaCo, MaCoConfig
from train import RECIPES, TrainConfig, build_dataset, resolve
from util.checkpoint import check_writable, save_checkpoint
from util.cli import check_options, option, overrides, run_script
from util.tokenizer import SPECIAL_TOKENS, encode_texts, train_tokenizer

MASK_ID = SPECIAL_TOKENS.index("[MASK]")  # 3: the special tokens are ids 0-3, [PAD] [UNK] [CLS] [MASK]


@dataclass
class WarmStartConfig:
    root: str = option("data/synthetic", "synthetic world or MIMIC-CXR-JPG folder (the training reports are read)")
    data: str = option("synthetic", "dataset, as train.py --data", choices=tuple(RECIPES))
    captions: str = option("report", "caption source, as train.py --captions", choices=CAPTION_SOURCES)
    out: str = option("runs/warm-text/checkpoint.pt", "the train.py checkpoint to write")
    epochs: int = option(10, "passes over the training reports (the loss plateaus for ~200 steps first)", minimum=1)
    batch_size: int = option(64, "captions per step", minimum=1)
    lr: float = option(1e-3, "AdamW learning rate (constant)", above=0)
    mask_prob: float = option(0.15, "fraction of word tokens chosen for prediction", above=0, below=1)
    seed: int = option(0, "random seed: use the seed of the train.py run that will start from this checkpoint",
                       minimum=0)
    model: dict = overrides(MaCoConfig, PRESETS, "model settings, as train.py's (the checkpoint must have the shapes "
                                                 "of the model that starts from it)")

    def __post_init__(self):
        check_options(self)


class MaskedReportHead(nn.Module):
    """BERT's prediction head: Linear, GELU, LayerNorm, then logits over the vocabulary with the word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        width = word_embeddings.embedding_dim
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))
        self.word_embeddings = word_embeddings  # tied: shared with the text encoder, not a copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, states):
        return self.transform(states) @ self.word_embeddings.weight.T + self.bias  # (..., V)


def mask_words(input_ids, attention_mask, vocab_size: int, mask_prob: float, generator: torch.Generator):
    """BERT's corruption of a batch (B, T): returns (inputs (B, T), labels (B, T) = the original id at the chosen
    positions, -100 elsewhere). Only word tokens are chosen: never [PAD], [CLS], [UNK] or [MASK]."""
    words = (attention_mask == 1) & (input_ids > MASK_ID)  # ids 0-3 are the special tokens
    chosen = words & (torch.rand(input_ids.shape, generator=generator) < mask_prob)
    labels = torch.where(chosen, input_ids, -100)
    draw = torch.rand(input_ids.shape, generator=generator)
    random_words = torch.randint(MASK_ID + 1, vocab_size, input_ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), MASK_ID, input_ids)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_words, inputs)
    return inputs, labels


def warm_start(cfg: WarmStartConfig) -> dict:
    """Train the text encoder by masked report modelling; write a train.py checkpoint; return its summary."""
    out = Path(cfg.out)
    if not Path(cfg.root).is_dir():
        raise FileNotFoundError(f"--root {cfg.root}: no such folder; the synthetic world is made by "
                                f"`python -m world.synthetic --out {cfg.root}` (or by the first `python train.py`)")
    check_writable(out.parent, "--out")
    train_cfg = resolve(TrainConfig(data=cfg.data, root=cfg.root, captions=cfg.captions, seed=cfg.seed,
                                    model=cfg.model))
    model_cfg = MaCoConfig.preset(train_cfg.preset, **cfg.model)
    dataset = build_dataset(train_cfg, model_cfg, is_main=True)
    tokenizer = train_tokenizer(dataset.report_texts(), vocab_size=model_cfg.vocab_size)  # as train.py makes it
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(train_cfg.seed)  # the initialisation train.py's MaCo gets with this seed
    model = MaCo(model_cfg)
    head = MaskedReportHead(model.text_encoder.embeddings.word_embeddings)
    optimizer = torch.optim.AdamW(list(model.text_encoder.parameters()) + list(head.transform.parameters())
                                  + [head.bias], lr=cfg.lr, weight_decay=0.01)
    reports = list(dict.fromkeys(dataset.reports[key] for _, _, key in dataset.items))
    generator = torch.Generator().manual_seed(cfg.seed)
    model.text_encoder.train()
    start, history = time.time(), []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(reports), generator=generator).tolist()
        correct = total = loss_sum = 0
        for first in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            captions = [report_to_caption(reports[i], generator) for i in order[first:first + cfg.batch_size]]
            batch = encode_texts(tokenizer, captions, model_cfg.max_len)
            inputs, labels = mask_words(batch["input_ids"], batch["attention_mask"], model_cfg.vocab_size,
                                        cfg.mask_prob, generator)
            states = model.text_encoder.hidden_states(inputs, batch["attention_mask"])  # (B, T, W)
            chosen = labels >= 0
            logits = head(states[chosen])  # (M, V), the M chosen positions
            loss = F.cross_entropy(logits, labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(-1) == labels[chosen]).sum())
            total += int(chosen.sum())
            loss_sum += loss.item() * int(chosen.sum())
        history.append(dict(epoch=epoch + 1, loss=loss_sum / max(total, 1), accuracy=correct / max(total, 1)))
        print(f"epoch {epoch + 1}: masked-word loss {history[-1]['loss']:.3f}, accuracy {history[-1]['accuracy']:.3f}")
    summary = dict(config=dataclasses.asdict(cfg), history=history, seconds=round(time.time() - start, 1))
    save_checkpoint(out, {"model": model.state_dict(), "model_config": dataclasses.asdict(model_cfg),
                          "tokenizer": tokenizer.to_str(), "warm_start": summary})
    print(f"wrote {out} ({summary['seconds']} s); train from it with: python train.py --init {out} --seed {cfg.seed}")
    return summary


def main(argv=None) -> int:
    return run_script(WarmStartConfig, lambda cfg: warm_start(cfg) and None, argv, __doc__,
                      errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
