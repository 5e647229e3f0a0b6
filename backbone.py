"""The pretrained ViT as a dense feature extractor (segment.py, detect.py); what the three fine-tuning scripts share.

A dense task needs maps, not one vector: the patch tokens of a few blocks, cls dropped, reshaped back onto the
patch grid (as the released UPerNet segmentation and ViTDet detection read MaCo's encoder). Three pieces:

  resize_pos_embed    the position table interpolated (bicubic) to the grid of a larger input (released: 224 -> 512),
                      kept fixed or made trainable (both released fine-tuning backbones train it)
  ViTBackbone         images (B, C, H, W) -> [(B, D, H/p, W/p) after each requested block], with or without the
                      cls token in the sequence
  layer_decay_groups  AdamW parameter groups with layer-wise learning-rate decay (BEiT / MAE practice) and the
                      weight-decay exemptions of one of three rules

the training loop of the three fine-tuning scripts (`fit_and_select`: validation-based selection, a resumable
state), and the choice of encoders they compare (finetune.py, segment.py, detect.py): the pretrained one
(`--ckpt`: a train.py checkpoint or the released maco.pth; `--init`: MAE's ImageNet weights) against a random one of
the same shape (`--scratch`).

vit.py keeps its position embeddings in a fixed, persistent buffer (2-D sine-cosine, or whatever table a checkpoint
brought), so resizing replaces that buffer with the interpolated one: still a buffer, still saved with the weights.
`resize_pos_embed(..., trainable=True)` turns it into a parameter instead (its state-dict key stays `pos_embed`).
"""

import copy
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from maco import PRESETS, MaCo, MaCoConfig, load
from util.checkpoint import check_writable
from util.devices import describe_precision, pick_device, resolve_precision
from util.progress import Progress
from util.resume import ResumableRun, as_floats, restore
from vit import VisionTransformer

RELEASED_BLOCKS = (3, 5, 7, 11)  # the released out_indices of ViT-B's 12 blocks (blocks 4, 6, 8 and 12)
RELEASED_DEPTH = 12


def block_indices_for(depth: int) -> tuple[int, ...]:
    """The blocks at the same relative depths as the released (3, 5, 7, 11) of 12: (3, 5, 7, 11) for base,
    (0, 1, 2, 3) for the tiny preset's 4 blocks. Block i (0-based) sits at depth (i + 1) / depth."""
    indices = tuple(max(0, round((i + 1) * depth / RELEASED_DEPTH) - 1) for i in RELEASED_BLOCKS)
    if len(set(indices)) < len(indices):
        raise ValueError(f"an encoder of {depth} blocks is too shallow for four distinct feature levels "
                         f"(got blocks {indices}); it needs at least 4 blocks")
    return indices


def pos_embed_grid(encoder: VisionTransformer) -> tuple[int, int]:
    """(rows, cols) of the patch grid the encoder's position table is for: square unless resize_pos_embed made it
    rectangular (it records the grid as encoder.pos_grid)."""
    if hasattr(encoder, "pos_grid"):
        return encoder.pos_grid
    side = round((encoder.pos_embed.shape[1] - 1) ** 0.5)
    return side, side


def resize_pos_embed(encoder: VisionTransformer, grid: tuple[int, int], trainable: bool = False) -> None:
    """Interpolate the encoder's patch position embeddings to a (rows, cols) grid, bicubically, in place; the cls
    slot is kept as it is. The table stays a persistent buffer (as vit.py stores it), so the weights of a model
    fine-tuned at the new size save and load with the new table; trainable=True makes it an nn.Parameter (the
    released mmseg and ViTDet backbones train it, at the patch embedding's layer-decayed lr)."""
    rows, cols = grid
    old_rows, old_cols = pos_embed_grid(encoder)
    table = encoder.pos_embed.detach()  # (1, 1 + old_rows * old_cols, D)
    if (rows, cols) != (old_rows, old_cols):
        width = table.shape[-1]
        patches = table[:, 1:].reshape(1, old_rows, old_cols, width).permute(0, 3, 1, 2)  # (1, D, r, c)
        patches = F.interpolate(patches.float(), size=(rows, cols), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, width)  # (1, rows * cols, D)
        table = torch.cat([table[:, :1], patches.to(table.dtype)], dim=1)  # (1, 1 + rows * cols, D)
        encoder.pos_grid = (rows, cols)
    del encoder.pos_embed  # a buffer (or a parameter, if made trainable before)
    if trainable:
        encoder.pos_embed = nn.Parameter(table.clone())
    else:
        encoder.register_buffer("pos_embed", table)


class ViTBackbone(nn.Module):
    """forward(images (B, C, H, W), H and W multiples of the patch size p) -> one map (B, D, H/p, W/p) per
    requested block, in the order of `block_indices`: the patch tokens after that block, without the final
    LayerNorm and without the cls token, nothing masked. The position table must be for the (H/p, W/p) grid
    (resize_pos_embed). Blocks after the last requested one are not run. cls_token=False: the sequence holds the
    patch tokens alone (ViTDet's backbone has no cls token; mmseg's MAE/MaCo backbone keeps it)."""

    def __init__(self, encoder: VisionTransformer, block_indices: tuple[int, ...], cls_token: bool = True):
        super().__init__()
        depth = len(encoder.blocks)
        if not block_indices or any(not 0 <= i < depth for i in block_indices):
            raise ValueError(f"block indices {tuple(block_indices)}: expected indices 0..{depth - 1} of the "
                             f"encoder's {depth} blocks")
        self.encoder = encoder
        self.block_indices = tuple(block_indices)
        self.cls_token = cls_token
        self.width = encoder.cls_token.shape[-1]
        self.patch_size = encoder.patch_size

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        rows, cols = H // p, W // p
        if (rows, cols) != pos_embed_grid(self.encoder):
            raise ValueError(f"images of {H}x{W} give a {rows}x{cols} patch grid, but the position embeddings are for "
                             f"{'x'.join(map(str, pos_embed_grid(self.encoder)))}: call "
                             f"resize_pos_embed(encoder, ({rows}, {cols})) first")
        encoder = self.encoder
        x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]  # (B, L, D), L = rows * cols
        if self.cls_token:
            cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + L, D)
        first = int(self.cls_token)
        maps = {}
        for index, block in enumerate(encoder.blocks[:max(self.block_indices) + 1]):
            x = block(x)
            if index in self.block_indices:
                maps[index] = x[:, first:].transpose(1, 2).reshape(B, self.width, rows, cols)  # (B, D, rows, cols)
        return [maps[index] for index in self.block_indices]


DECAY_EXEMPTIONS = {  # which parameters AdamW's weight decay skips
    "norms_biases_tokens": "every 1-D tensor (norms, biases), the cls token and the position table (MAE, BEiT)",
    "released_mmseg": "1-D tensors and biases: the released mmseg constructor's check for pos_embed and cls_token "
                      "compares bare names with the prefixed backbone.* names and never matches",
    "released_vitdet": "the ViT's own LayerNorms and the position table only (detectron2: torch norm types and the "
                       "pos_embed override; biases and the pyramid's LayerNorms are decayed)",
}
LAYER_IDS = {  # how a parameter's layer id (its lr scale) is found
    "by_block": "patch embedding, cls token and positions 0, block i i + 1, the rest depth + 1 (MAE, BEiT, ViTDet)",
    "released_mmseg": "stock mmseg 0.25 on the released backbone: it looks for backbone.layers.*, MaCo names its "
                      "blocks blocks.*, so every block lands at depth + 1 (scale 1); patch embedding, cls, positions 0",
}


def layer_decay_groups(encoder: VisionTransformer, others: nn.Module, weight_decay: float, layer_decay: float,
                       decay_exempt: str = "norms_biases_tokens", layer_ids: str = "by_block") -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay; each group's `lr_scale` multiplies the lr.

    Layer ids as released (BEiT's and MAE's, layer_ids="by_block"): patch embedding, cls token and position
    table 0; block i, i + 1; the encoder's final norm and everything in `others` (pyramid, heads) depth + 1.
    Scale = layer_decay ** (depth + 1 - layer id): 1 for the heads, layer_decay for the last block,
    layer_decay ** depth for the first, layer_decay ** (depth + 1) for the patch embedding. (MAE writes
    num_layers = depth + 1 and scale = decay ** (num_layers - id); the mmseg constructor the released configs
    name, num_layers = 12 + 2 and decay ** (num_layers - id - 1): the same numbers.) layer_ids="released_mmseg":
    every block at depth + 1 (see LAYER_IDS). No weight decay on the parameters of the `decay_exempt` rule
    (DECAY_EXEMPTIONS). `others` may contain the encoder (the whole model): a parameter is placed once, by its
    encoder name.
    """
    if decay_exempt not in DECAY_EXEMPTIONS or layer_ids not in LAYER_IDS:
        raise ValueError(f"decay_exempt {decay_exempt!r}, layer_ids {layer_ids!r}: expected one of "
                         f"{', '.join(DECAY_EXEMPTIONS)} and one of {', '.join(LAYER_IDS)}")
    depth = len(encoder.blocks)
    encoder_norms = {id(p) for m in encoder.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    named = [(f"encoder.{name}", param) for name, param in encoder.named_parameters()]
    named += [(f"others.{name}", param) for name, param in others.named_parameters()]
    groups, placed = {}, set()
    for name, param in named:
        if not param.requires_grad or id(param) in placed:
            continue
        placed.add(id(param))
        if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
            layer_id = 0
        elif name.startswith("encoder.blocks.") and layer_ids == "by_block":
            layer_id = int(name.split(".")[2]) + 1
        else:
            layer_id = depth + 1
        if decay_exempt == "norms_biases_tokens":
            exempt = param.ndim == 1 or name.endswith((".bias", "cls_token", "pos_embed"))
        elif decay_exempt == "released_mmseg":
            exempt = param.ndim == 1 or name.endswith(".bias")
        else:
            exempt = id(param) in encoder_norms or name == "encoder.pos_embed"
        key = (layer_id, exempt)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if exempt else weight_decay,
                           "lr_scale": layer_decay ** (depth + 1 - layer_id), "layer_id": layer_id}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def fit_and_select(model: nn.Module, optimizer: torch.optim.Optimizer, batches, steps: int, eval_interval: int,
                   loss_of, lr_at, validate, keep: str = "best", clip_grad: float | None = None, on_best=None,
                   desc: str = "", metric: str = "val", run: ResumableRun | None = None,
                   state: dict | None = None) -> dict:
    """The training loop of finetune.py, segment.py and detect.py. Each of `steps` steps: every group of
    `optimizer` at lr lr_at(steps done before this one) x its lr_scale, one batch from `batches`, loss_of(batch)
    (forward and loss, a scalar tensor), a backward, the gradient norm clipped to `clip_grad` (None: not clipped)
    and an optimizer step. Validation (validate(): a score, higher is better) at step 0, every `eval_interval`
    steps and at the end; on_best(step, score) after each new best. At the end the best step's weights are loaded
    back (keep "best"; "last" keeps the last step's). `run`: writes the resumable state after the steps it says;
    `state`: an interrupted run's, to continue from (`batches` must continue where it stopped). Returns
    {best_step, best_val, losses (one per step), validations {step: score}}."""
    if state is not None:
        start, best, validations, losses = restore(state, model, optimizer)
    else:
        start, best = 0, dict(best_step=0, best_val=validate(), state=copy.deepcopy(model.state_dict()))
        validations, losses = {0: best["best_val"]}, []
        if on_best is not None:
            on_best(0, best["best_val"])
    params = [param for group in optimizer.param_groups for param in group["params"]]
    progress = Progress(steps, desc, start)
    model.train()
    for step in range(start + 1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1) * group["lr_scale"]
        loss = loss_of(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        losses.append(loss.detach())  # no host sync per step: read back when a state is written, and at the end
        if step % eval_interval == 0 or step == steps:
            validations[step] = score = validate()
            if score > best["best_val"] or math.isnan(best["best_val"]):
                best.update(best_step=step, best_val=score, state=copy.deepcopy(model.state_dict()))
                if on_best is not None:
                    on_best(step, score)
            progress.update(0, **{metric: f"{score:.3f}"})
        progress.update(loss=losses[-1])
        if run is not None:
            run.after_step(step, model, optimizer, best, validations, losses)
    progress.close()
    weights = best.pop("state")
    if keep == "best":
        model.load_state_dict(weights)
    return dict(best, losses=as_floats(losses), validations=validations)


# ----------------------------------------------------------------------------------------------------------
# Which encoders a fine-tuning script compares

DEFAULT_CKPT = "runs/maco/checkpoint.pt"  # what `python train.py` writes


def new_encoder(cfg: MaCoConfig) -> VisionTransformer:
    return VisionTransformer(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.width, cfg.depth, cfg.num_heads,
                             cfg.mlp_ratio)


def preset_name(cfg: MaCoConfig) -> str:
    keys = ("img_size", "patch_size", "in_chans", "width", "depth", "num_heads")
    return next((name for name in PRESETS if all(getattr(MaCoConfig.preset(name), k) == getattr(cfg, k)
                                                  for k in keys)), "custom")


def recipe_settings(cfg, recipes: dict, groups: dict) -> list[tuple[str, dict, object]]:
    """(name, recipe, settings) for each recipe cfg.recipe names (a group runs several): the recipe's value for every
    setting left unset (None). An MAE (--init) or a random (--scratch) encoder replaces the recipe's checkpoint."""
    result = []
    for name in groups.get(cfg.recipe, [cfg.recipe]):
        recipe = recipes[name]
        filled = {key: value for key, value in recipe.items() if hasattr(cfg, key) and getattr(cfg, key) is None}
        if cfg.init or cfg.scratch:
            filled.pop("ckpt", None)
        result.append((name, recipe, dataclasses.replace(cfg, recipe=name, **filled)))
    return result


def check_encoder_flags(cfg, groups: dict) -> None:
    """The flags that choose the encoder, and --label-fraction, checked together (a script config's __post_init__;
    `groups`: recipe name -> the recipes it runs)."""
    if cfg.ckpt and cfg.init:
        raise ValueError("pass --ckpt or --init, not both: they are two ways to initialise the encoder")
    if cfg.scratch and (cfg.ckpt or cfg.init):
        raise ValueError("--scratch initialises the encoder randomly; drop --ckpt/--init (or use --no-scratch)")
    if cfg.label_fraction is not None and cfg.recipe in groups:
        raise ValueError(f"--label-fraction applies to one recipe (e.g. {groups[cfg.recipe][1]}), "
                         f"not to --recipe {cfg.recipe}, which runs {', '.join(groups[cfg.recipe])}")


def encoders_to_compare(setting) -> list[dict]:
    """[{name, label, encoder, cfg}] in table order, for a dense task's config `setting` (segment.py, detect.py): the
    --ckpt (or --init) encoder unless --scratch, then a random encoder of the same shape unless --no-scratch
    (setting.scratch None: both). A checkpoint of another preset than the recipe's is an error."""
    inits = []
    if not setting.scratch:
        if setting.init:
            cfg = MaCoConfig.preset(setting.preset)
            model, _ = load(setting.init, into=MaCo(cfg))
            inits.append(dict(name="mae", label=f"MAE {setting.preset}", encoder=model.image_encoder, cfg=cfg))
        elif not setting.ckpt:
            raise ValueError(f"--recipe {setting.recipe}: pass --ckpt, --init or --scratch")
        elif not Path(setting.ckpt).is_file():
            hint = "run `python train.py` first (it trains the tiny MaCo), " if setting.ckpt == DEFAULT_CKPT else ""
            raise FileNotFoundError(f"no checkpoint at {setting.ckpt}: {hint}or pass --ckpt PATH, --init PATH or --scratch")
        else:
            model, _ = load(setting.ckpt, setting.tokenizer or None)
            encoder, cfg = model.image_encoder, model.cfg
            if preset_name(cfg) != setting.preset:
                raise ValueError(f"--ckpt {setting.ckpt} is a {preset_name(cfg)} model, but --recipe {setting.recipe} uses the "
                                 f"{setting.preset} preset: pass a {setting.preset} checkpoint, or --preset "
                                 f"{preset_name(cfg)} with an --img-size and head widths to suit it")
            inits.append(dict(name="maco", label=f"MaCo {setting.preset}", encoder=encoder, cfg=cfg))
    if setting.scratch is not False:
        cfg = inits[0]["cfg"] if inits else MaCoConfig.preset(setting.preset)
        torch.manual_seed(setting.seed)
        inits.append(dict(name="scratch", label=f"scratch {preset_name(cfg)}", encoder=new_encoder(cfg), cfg=cfg))
    patch = inits[0]["cfg"].patch_size
    if setting.img_size % patch:
        raise ValueError(f"--img-size {setting.img_size} is not a multiple of the encoder's patch size {patch}")
    return inits


def set_up_runs(cfg, runs: list) -> tuple[list, torch.device, Path, list[dict]]:
    """What segment.py and detect.py do before training: the device, the precision resolved into every run's
    settings (and said once), the output folders checked, and the encoders to compare."""
    device = pick_device(cfg.device)
    print(describe_precision(cfg.precision, device))
    runs = [dataclasses.replace(setting, precision=resolve_precision(cfg.precision, device)) for setting in runs]
    out_dir = check_writable(cfg.out_dir, "--out-dir")
    if cfg.figure:
        check_writable(Path(cfg.figure).parent, "--figure")
    return runs, device, out_dir, encoders_to_compare(runs[0])
