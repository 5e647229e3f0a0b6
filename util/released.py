"""The released MaCo weights (`maco.pth`, github.com/SZUHvern/MaCo) in this project's model (docs/method.md §12, D12).

    model, tokenizer = maco.load("maco.pth", "mimic_wordpiece.json")

The released pretraining code saves `{"model": state_dict, "optimizer", "epoch", "scaler", "args"}`, where `args`
is its command line, an `argparse.Namespace`. The file is read with `weights_only=True` and that one class
allowed: anything else pickled in it is refused, since unpickling it could run code from the file. The state dict
uses the released module names (timm's ViT, Hugging Face's BERT); every key is renamed to ours, every shape is
checked, and a key this file does not know is an error, never skipped:

    released (released `model_MaCo.py`, `bert/bert_encoder.py`)        this project
    patch_embed.*, cls_token, pos_embed, blocks.*, norm.*             image_encoder.<same name>
    decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.*,   the same names
      decoder_norm, decoder_pred
    bert_encoder.model.bert.embeddings.*                              text_encoder.embeddings.*
    ....encoder.layer.<i>.attention.self.{query,key,value}            text_encoder.layers.<i>.attention.{...}
    ....encoder.layer.<i>.<attention.output.dense, ...>               text_encoder.layers.<i>.<TEXT_LAYER[...]>
    ....pooler.dense (384 -> 768 in maco.pth)                         text_encoder.pooler
    img_mlp                                                           image_proj
    pos_weight_img                                                    correlation_head
    Tpar (the raw inverse temperature, docs/method.md §6.7)           logit_scale

That is 314 tensors for `base`; the 14 other keys of maco.pth are dropped, and reported (DROPPED). The fixed
position tables are loaded from the file, not recomputed: the released decoder table uses another frequency scale
than MAE's (docs/method.md §13), and the weights were trained with it. The settings read from the shapes are the
super-resolution target (`decoder_pred`, the released `--SR` flag) and the preset (`base` for maco.pth; `tiny` for
a small file in the same layout, as the tests write); the vocabulary size is the tokenizer's. Every other shape
must be the preset's.
"""

import argparse
import dataclasses
import re
from dataclasses import dataclass

import torch

from util.checkpoint import read_checkpoint

ALLOWED_CLASSES = (argparse.Namespace,)  # the released command line, pickled under "args"
BERT = "bert_encoder.model.bert."
WIDTH_KEYS = ("pos_embed", BERT + "embeddings.word_embeddings.weight")  # the image and text widths: the preset
# a layer of the released (Hugging Face) BERT, `encoder.layer.<i>.<name>` -> ours, `layers.<i>.<name>`
TEXT_LAYER = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
HEADS = {"img_mlp.": "image_proj.", "pos_weight_img.": "correlation_head.", "Tpar": "logit_scale"}
IMAGE_ENCODER = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
DECODER = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
# released keys (a name ending in "." covers every key under it) that MaCo never uses, and why
DROPPED = {
    "logit_scale": "ln(1/0.07), never used: the released temperature is Tpar",
    "bert_encoder.model.cls.predictions.": "masked-language-model head, computed but never used (docs/method.md §13)",
    "pos_weight_text.": "never used",
    "pos_cat.": "never used",
    "WCE.weight": "the last batch's loss weights, saved by accident (docs/method.md §13)",
    BERT + "embeddings.position_ids": "index buffer 0, 1, 2, ..., made at every forward",
    BERT + "embeddings.token_type_ids": "index buffer of zeros, made at every forward",
}


def _covers(entry: str, key: str) -> bool:
    return key.startswith(entry) if entry.endswith(".") else key == entry


def dropped_entry(key: str) -> str | None:
    """The DROPPED entry that covers a released key, or None if the key is loaded."""
    return next((entry for entry in DROPPED if _covers(entry, key)), None)


def our_name(key: str) -> str | None:
    """This project's name for a released key that is loaded; None if this file does not know the key."""
    if any(_covers(prefix, key) for prefix in IMAGE_ENCODER):
        return "image_encoder." + key
    if any(_covers(prefix, key) for prefix in DECODER):
        return key
    for old, new in HEADS.items():
        if _covers(old, key):
            return new + key[len(old):]
    if key.startswith(BERT + "embeddings."):
        return "text_encoder." + key[len(BERT):]
    if key.startswith(BERT + "pooler.dense."):
        return "text_encoder.pooler." + key[len(BERT + "pooler.dense."):]
    layer = re.fullmatch(re.escape(BERT) + r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
    if layer and layer[2] in TEXT_LAYER:
        return f"text_encoder.layers.{layer[1]}.{TEXT_LAYER[layer[2]]}.{layer[3]}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Reading the file

def read_weights(path, what: str = "weights") -> dict:
    """The file, read with weights_only=True; plain data and argparse.Namespace only (see the module docstring)."""
    return read_checkpoint(path, what, allowed_classes=ALLOWED_CLASSES)


def released_state(checkpoint: dict) -> dict | None:
    """The released state dict in a file already read (under "model", or the file itself: a bare state dict);
    None if the file holds no released MaCo weights (no `bert_encoder.*` key)."""
    state = checkpoint.get("model", checkpoint)
    if isinstance(state, dict) and any(isinstance(key, str) and key.startswith("bert_encoder.") for key in state):
        return state
    return None


# ----------------------------------------------------------------------------------------------------------
# Matching the file to a model

@dataclass
class Report:
    """What a load did: `loaded` maps each released key to the model's tensor it filled; `dropped` lists the
    released keys left out (each covered by an entry of DROPPED)."""
    source: str
    loaded: dict[str, str]
    dropped: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        groups = {}
        for key in self.dropped:
            entry = dropped_entry(key)
            groups[entry] = groups.get(entry, 0) + 1
        dropped = ", ".join(f"{entry}* ({count})" if entry.endswith(".") else entry for entry, count in groups.items())
        return "; ".join([f"{self.source}: loaded {len(self.loaded)} released tensors into MaCo",
                          f"dropped {len(self.dropped)} it never uses: {dropped or 'none'}", *self.notes])


def _listed(problems: list[str], limit: int = 12) -> str:
    shown = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
    return "\n  " + "\n  ".join(shown)


def _shape_problem(key: str, name: str, found: tuple, wanted: tuple, cfg) -> str:
    problem = f"{key} -> {name}: file {found} vs model {wanted}"
    if key.endswith("pooler.dense.weight") and len(found) == 2 and found[0] == found[1]:
        problem += (f"\n    A square {found[1]} -> {found[0]} text pooler is the one the released *code* builds "
                    f"(issue SZUHvern/MaCo#4; docs/method.md §13): it cannot give the {cfg.embed_dim}-wide report "
                    f"embedding MaCo compares with the image. The released maco.pth has a {cfg.text_width} -> "
                    f"{cfg.embed_dim} pooler (weight ({cfg.embed_dim}, {cfg.text_width})); load that file, or "
                    f"weights trained with such a pooler.")
    if key == "decoder_pred.weight":
        other = dataclasses.replace(cfg, super_resolution=not cfg.super_resolution)
        if found[0] == other.target_patch_size ** 2 * cfg.in_chans:
            problem += (f" (the file was trained {'with' if other.super_resolution else 'without'} the "
                        f"super-resolution target: super_resolution={other.super_resolution}, "
                        f"--{'' if other.super_resolution else 'no-'}super-resolution)")
    return problem


def match(model, state: dict, source: str) -> Report:
    """Pair every released tensor with one of the model's, strictly. Raises ValueError naming every key this file
    does not know, every model tensor the file lacks, and every shape that differs (key and both shapes)."""
    own = model.state_dict()
    loaded, dropped, problems = {}, [], []
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            problems.append(f"{key!r}: not a named tensor ({type(value).__name__})")
        elif dropped_entry(key):
            dropped.append(key)
        elif our_name(key) is None:
            problems.append(f"{key}: a key this loader does not know")
        elif our_name(key) not in own:
            problems.append(f"{key} -> {our_name(key)}: this model has no such tensor")
        else:
            name = loaded[key] = our_name(key)
            if tuple(value.shape) != tuple(own[name].shape):
                problems.append(_shape_problem(key, name, tuple(value.shape), tuple(own[name].shape), model.cfg))
    missing = sorted(set(own) - set(loaded.values()))
    problems += [f"{name}: the file has no tensor for it" for name in missing]
    if problems:
        raise ValueError(f"{source} does not fit this model ({len(problems)} problem(s)):" + _listed(problems))
    return Report(source, loaded, dropped)


def load_state(model, state: dict, source: str) -> Report:
    """Copy the released state dict into `model` (match's checks first, then a strict load_state_dict)."""
    report = match(model, state, source)
    model.load_state_dict({name: state[key] for key, name in report.loaded.items()}, strict=True)
    if model.logit_scale.item() > model.cfg.logit_scale_max:  # the released Tpar is unclamped (D4)
        report.notes.append(f"its inverse temperature Tpar = {model.logit_scale.item():.2f} is above the clamp at "
                            f"{model.cfg.logit_scale_max:g} of the training forward (--logit-scale-max)")
    return report
