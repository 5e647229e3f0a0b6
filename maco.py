"""MaCo: masked image modelling plus correlation-weighted image-report contrast, wired together.

docs/method.md §1-§6 (decisions D1-D5). One forward pass:
  1. the image (2S x 2S with the super-resolution target) is downsampled to S x S and half its patches are masked;
  2. the ViT encodes the visible patches; a light decoder predicts every masked patch of the full-size image;
  3. the visible patch tokens, projected and averaged, meet the report embedding in a contrastive loss whose
     per-pair weight is softplus of a linear function of *which* patches were visible (the correlation head).
"""

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from loss import clip_loss, correlation_weighted_contrastive_loss, reconstruction_loss
from text_encoder import TextEncoder
from util import released
from util.released import load_state, read_weights, released_state
from util.tokenizer import as_tokenizer, check_special_tokens
from vit import Block, VisionTransformer, init_vit_weights, patchify, sincos_2d_pos_embed


@dataclass
class MaCoConfig:
    """The model's shapes and objectives. Defaults are `base` (the paper's and the released checkpoint's shapes);
    `MaCoConfig.preset("tiny")` is the CPU preset. train.py makes every field a flag (`--img-size`, ...), with the
    comment beside it as the help."""
    # image encoder (ViT)
    img_size: int = 224  # encoder input side S in pixels (the training input is 2S with super-resolution)
    patch_size: int = 16  # ViT patch side p; the grid has (S/p)^2 patches
    in_chans: int = 3  # image channels (the grey image is replicated)
    width: int = 768  # image encoder width
    depth: int = 12  # image encoder blocks
    num_heads: int = 12  # image encoder attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / width, encoder and decoder
    # decoder
    decoder_width: int = 768  # reconstruction decoder width
    decoder_depth: int = 4  # reconstruction decoder blocks
    decoder_num_heads: int = 6  # reconstruction decoder attention heads
    # text encoder (BERT-style) and the joint embedding
    vocab_size: int = 30000  # text vocabulary size (training sets it from the tokenizer)
    text_width: int = 384  # text encoder width
    text_depth: int = 6  # text encoder layers
    text_num_heads: int = 6  # text encoder attention heads
    text_ffn_width: int = 1536  # text encoder feed-forward width
    max_len: int = 100  # report tokens, [CLS] included (longer reports are truncated)
    text_dropout: float = 0.1  # dropout in the text encoder
    embed_dim: int = 768  # joint image-report embedding width
    # objectives
    super_resolution: bool = True  # D2: predict (2p)x(2p) patches of a 2S x 2S input
    mask_ratio: float = 0.5  # fraction of patches masked; 0 = contrastive learning alone
    lam: float = 0.5  # D3: loss = lam * L_rec + (1 - lam) * L_con
    norm_pix_loss: bool = False  # normalise each target patch (off in MaCo's recipe)
    correlation_weighting: bool = True  # D5: correlation-weighted loss; off = plain symmetric InfoNCE
    mask_identical_captions: bool = False  # pairs with identical captions are not negatives (an option, off in MaCo)
    logit_scale_init: float = 1 / 0.03  # D4: initial raw inverse temperature
    logit_scale_max: float = 100.0  # D4: the inverse temperature is clamped at this value

    def __post_init__(self):
        """Check every range and every shape constraint; messages name the fields (the CLI shows them as flags)."""
        smallest = dict(img_size=1, patch_size=1, in_chans=1, width=4, depth=1, num_heads=1, decoder_width=4,
                        decoder_depth=1, decoder_num_heads=1, vocab_size=5, text_width=1, text_depth=1,
                        text_num_heads=1, text_ffn_width=1, max_len=2, embed_dim=1)
        for name, lowest in smallest.items():
            if not getattr(self, name) >= lowest:
                raise ValueError(f"{name} {getattr(self, name)!r}: must be >= {lowest}")
        intervals = [("text_dropout", 0 <= self.text_dropout < 1, ">= 0 and < 1"),
                     ("mask_ratio", 0 <= self.mask_ratio < 1, ">= 0 and < 1"), ("lam", 0 <= self.lam <= 1, ">= 0 and <= 1"),
                     ("mlp_ratio", self.mlp_ratio > 0, "> 0"), ("logit_scale_init", self.logit_scale_init > 0, "> 0"),
                     ("logit_scale_max", self.logit_scale_max > 0, "> 0")]
        for name, inside, rule in intervals:  # `inside` is False for NaN too
            if not inside:
                raise ValueError(f"{name} {getattr(self, name)!r}: must be {rule}")
        divisible = [("img_size", "patch_size"), ("width", "num_heads"), ("decoder_width", "decoder_num_heads"),
                     ("text_width", "text_num_heads")]
        for a, b in divisible:
            if getattr(self, a) % getattr(self, b):
                raise ValueError(f"{a} {getattr(self, a)} must be a multiple of {b} {getattr(self, b)}")
        for name in ("width", "decoder_width"):  # the 2-D sine-cosine position tables
            if getattr(self, name) % 4:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of 4")
        if self.num_patches * (1 - self.mask_ratio) < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch of {self.num_patches}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def input_size(self) -> int:
        """Side of the images the training forward takes: 2S with the super-resolution target, else S."""
        return 2 * self.img_size if self.super_resolution else self.img_size

    @property
    def target_patch_size(self) -> int:
        """Side of the patch the decoder predicts per grid cell: 2p of the 2S image (D2), else p."""
        return 2 * self.patch_size if self.super_resolution else self.patch_size

    @classmethod
    def preset(cls, name: str, **overrides) -> "MaCoConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # D1: the paper's and the released checkpoint's shapes (ViT-B/16, 768/4/6 decoder, BERT 384/6/6, pooler -> 768)
    "base": {},
    # For CPUs: a 64-pixel encoder on 8-pixel patches keeps the 8x8 = 64-patch grid coarse enough to learn in
    # minutes, yet fine enough to place a finding on a side and in a zone; one grey channel (nothing to match
    # ImageNet weights); widths a quarter of base or less. A step at batch 32 costs well under a second on 2 cores.
    "tiny": dict(img_size=64, patch_size=8, in_chans=1, width=192, depth=4, num_heads=3,
                 decoder_width=128, decoder_depth=2, decoder_num_heads=4,
                 vocab_size=4096, text_width=128, text_depth=2, text_num_heads=2, text_ffn_width=512,
                 embed_dim=192),
}


def caption_keys(input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids (B, T) -> (B,) int64 keys, equal for equal token sequences whatever the padding ([PAD] is id 0): a
    fixed random linear hash with int64 wrap-around, so unequal captions collide with probability ~2^-64."""
    weights = torch.randint(-2 ** 62, 2 ** 62, (input_ids.shape[1],), generator=torch.Generator().manual_seed(0))
    return (input_ids.long() * weights.to(input_ids.device)).sum(dim=1)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over all processes along dim 0, keeping the gradient to every slice (D11)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


class MaCo(nn.Module):
    """The whole model: image encoder, reconstruction decoder, text encoder, image projection, correlation head
    and the learnable inverse temperature (docs/method.md §6.4 traces one step with shapes).

    forward(images (B, C, 2S, 2S) or (B, C, S, S) without super-resolution, input_ids (B, T), attention_mask (B, T)):
      the encoder sees K = floor(N (1 - mask_ratio)) visible patches of the S x S image; the decoder predicts all N
      patch positions; image embeddings (B, E), report embeddings (B, E) and correlation scores (B,) are then
      gathered over the processes of a distributed run, so the contrastive loss sees G = B x world size pairs
      (G = B in a single process). Returns the losses and the (G,) correlation weights (see `forward`).
    Evaluation uses `encode_image` (unmasked), `encode_text` and `spatial_prior`.
    """

    def __init__(self, cfg: MaCoConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = VisionTransformer(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.width, cfg.depth,
                                               cfg.num_heads, cfg.mlp_ratio)
        # decoder: predicts the pixels of every masked patch (of the 2x image with the super-resolution target)
        self.decoder_embed = nn.Linear(cfg.width, cfg.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        self.register_buffer("decoder_pos_embed", sincos_2d_pos_embed(cfg.decoder_width, cfg.grid_size))
        self.decoder_blocks = nn.ModuleList([Block(cfg.decoder_width, cfg.decoder_num_heads, cfg.mlp_ratio)
                                             for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_width, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_width, cfg.target_patch_size ** 2 * cfg.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        # contrastive heads
        self.text_encoder = TextEncoder(cfg.vocab_size, cfg.text_width, cfg.text_depth, cfg.text_num_heads,
                                        cfg.text_ffn_width, cfg.max_len, dropout=cfg.text_dropout,
                                        embed_dim=cfg.embed_dim)
        self.image_proj = nn.Linear(cfg.width, cfg.embed_dim)
        init_vit_weights(self.image_proj)
        # correlation head (released name `pos_weight_img`): the correlation score r = v . w + b of the visibility
        # v of the N patch positions; zero at init, so every correlation weight c = softplus(r) starts at ln 2
        self.correlation_head = nn.Linear(cfg.num_patches, 1)
        nn.init.zeros_(self.correlation_head.weight)
        nn.init.zeros_(self.correlation_head.bias)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))  # D4: raw, not log-parameterised

    # -- encoders -------------------------------------------------------------------------------------------
    def encode_image(self, images):
        """Unmasked encoder, for evaluation. images (B, C, S, S) ->
        patch_emb (B, N, embed_dim) the projected patch tokens, image_emb (B, embed_dim) their mean."""
        h, _, _ = self.image_encoder(images, mask_ratio=0.0)  # (B, 1 + N, D)
        patch_emb = self.image_proj(h[:, 1:])  # (B, N, E)
        return patch_emb, patch_emb.mean(dim=1)

    def encode_text(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, T) -> report embedding (B, embed_dim)."""
        return self.text_encoder(input_ids, attention_mask)

    def spatial_prior(self, temperature: float = 0.02) -> torch.Tensor:
        """The grounding prior alpha = softmax(w / temperature) over the N patch positions, (N,), from the correlation
        head's weights w: positions whose visibility raised the correlation weight in training (D10, §9)."""
        return torch.softmax(self.correlation_head.weight.reshape(-1) / temperature, dim=0)

    def decode(self, h, ids_restore):
        """h (B, 1 + K, D) encoder output -> pred (B, N, P) pixel predictions for every patch position."""
        z = self.decoder_embed(h)  # (B, 1 + K, Dd)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N - (z.shape[1] - 1), -1)  # (B, N - K, Dd)
        patches = torch.cat([z[:, 1:], mask_tokens], dim=1)  # (B, N, Dd) in shuffled order
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, z.shape[2]))  # original order
        z = torch.cat([z[:, :1], patches], dim=1) + self.decoder_pos_embed  # (B, 1 + N, Dd)
        for block in self.decoder_blocks:
            z = block(z)
        return self.decoder_pred(self.decoder_norm(z))[:, 1:]  # (B, N, P), cls row dropped

    # -- training forward -----------------------------------------------------------------------------------
    def forward(self, images, input_ids, attention_mask, generator: torch.Generator | None = None):
        """images (B, C, input_size, input_size) normalised; input_ids, attention_mask (B, T).

        Returns a dict: loss, loss_rec, loss_con (scalars), correlation_weights (G,) the weights c of the
        gathered batch, logit_scale (the clamped inverse temperature), pred (B, N, P) or None, mask (B, N)
        1 = masked.
        """
        cfg = self.cfg
        if images.shape[-1] != cfg.input_size or images.shape[-2] != cfg.input_size:
            raise ValueError(f"MaCo expects {cfg.input_size}x{cfg.input_size} images "
                             f"(super_resolution={cfg.super_resolution}), got {tuple(images.shape[-2:])}")
        if cfg.super_resolution:  # D2: the encoder sees the bicubic-downsampled image, the decoder predicts the 2x one
            encoder_input = F.interpolate(images, size=(cfg.img_size, cfg.img_size), mode="bicubic",
                                          align_corners=False)
        else:
            encoder_input = images
        h, mask, ids_restore = self.image_encoder(encoder_input, cfg.mask_ratio, generator)  # (B, 1 + K, D)

        if cfg.mask_ratio > 0:
            pred = self.decode(h, ids_restore)  # (B, N, P)
            target = patchify(images, cfg.target_patch_size)  # (B, N, P)
            loss_rec = reconstruction_loss(pred, target, mask, cfg.norm_pix_loss)
        else:  # nothing is masked, so there is nothing to reconstruct
            pred, loss_rec = None, torch.zeros((), device=images.device)

        image_emb = self.image_proj(h[:, 1:]).mean(dim=1)  # (B, E) mean over the visible tokens, cls excluded
        text_emb = self.encode_text(input_ids, attention_mask)  # (B, E)
        visibility = (1 - mask).to(self.correlation_head.weight.dtype)  # (B, N) 1 = visible
        correlation_scores = self.correlation_head(visibility).squeeze(-1)  # (B,) r = v . w + b
        image_emb, text_emb, correlation_scores = (all_gather_with_grad(t)
                                                   for t in (image_emb, text_emb, correlation_scores))  # (G, ...)
        logit_scale = self.logit_scale.clamp(max=cfg.logit_scale_max)  # D4
        excluded = None
        if cfg.mask_identical_captions:  # (G, G) True for two different pairs with the same caption
            keys = all_gather_with_grad(caption_keys(input_ids))  # (G,)
            excluded = (keys[:, None] == keys[None, :]) & ~torch.eye(len(keys), dtype=torch.bool, device=keys.device)
        if cfg.correlation_weighting:
            correlation_weights = F.softplus(correlation_scores)  # (G,) c = log(1 + e^r), computed stably
            loss_con = correlation_weighted_contrastive_loss(image_emb, text_emb, correlation_weights, logit_scale,
                                                             excluded)
        else:
            correlation_weights = torch.ones_like(correlation_scores)
            loss_con = clip_loss(image_emb, text_emb, logit_scale, excluded)
        loss = cfg.lam * loss_rec + (1 - cfg.lam) * loss_con if cfg.mask_ratio > 0 else loss_con
        return {"loss": loss, "loss_rec": loss_rec, "loss_con": loss_con, "correlation_weights": correlation_weights,
                "logit_scale": logit_scale, "pred": pred, "mask": mask}

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizer(self, lr: float, weight_decay: float, betas=(0.9, 0.95), device_type: str = "cpu"):
        """AdamW with the paper's betas (fused on GPUs). No weight decay on biases, norms, the cls/mask tokens,
        learned position embeddings or the temperature: every tensor of fewer than 2 dimensions, plus those named."""
        no_decay_names = ("cls_token", "mask_token", "position_embeddings", "logit_scale")
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim < 2 or any(key in name for key in no_decay_names):
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda"))


# ---------------------------------------------------------------------------------------------------------------
# Loading weights: `load` is the one way in, for every kind of file (docs/method.md §12, D12)

TRAIN_CHECKPOINT_KEYS = ("model", "model_config", "tokenizer")  # what building a model needs from a train.py file


def load(path, tokenizer=None, device="cpu", *, into: MaCo | None = None, preset: str | None = None,
         verbose: bool = True) -> tuple[MaCo, Tokenizer | None]:
    """Any weights file -> (MaCo in eval mode, its tokenizer). The file is read once, safely (plain data only):
      - a train.py checkpoint: the model and the tokenizer it carries (a `tokenizer` given must have its vocabulary);
      - the released maco.pth: needs `tokenizer`, the released mimic_wordpiece.json (a path or a Tokenizer); every
        key is renamed to ours and checked, and what is dropped is printed (util/released.py). `preset`: the model's
        preset (default: the one whose widths fit the file);
      - MAE's ImageNet checkpoint (mae_pretrain_vit_base.pth): image encoder weights only, so it needs `into`.
    `into`: copy the file's weights into this existing model instead (train.py --init, finetune.py --init): the
    whole model from a train.py checkpoint (a warm start, docs/alignment.md; `into` must have its shapes and use its
    tokenizer) or from the released weights, the image encoder from MAE's. Returns (into, tokenizer or None)."""
    checkpoint = read_weights(path, "weights")
    if "model_config" in checkpoint:
        model, own_tokenizer = _from_train_checkpoint(checkpoint, path, tokenizer, device)
        if into is None:
            return model, own_tokenizer
        _copy_whole_model(into, model, path)
        return into.to(device), own_tokenizer
    state = released_state(checkpoint)
    if state is None:
        if into is None:
            raise ValueError(f"weights {path}: neither a train.py checkpoint (no model_config) nor the released MaCo "
                             f"weights (no bert_encoder.* keys); an MAE checkpoint loads only into a model's image "
                             f"encoder (maco.load(path, into=model))")
        report = _load_mae_encoder(into, checkpoint, path)
        if verbose:
            print(report)
        return into.to(device), None
    if tokenizer is None:
        raise ValueError(f"{path} holds the released MaCo weights, which come without a tokenizer: pass the released "
                         f"mimic_wordpiece.json (--tokenizer mimic_wordpiece.json)")
    tokenizer = as_tokenizer(tokenizer)
    if into is None:
        into = MaCo(_released_config(state, preset, vocab_size=tokenizer.get_vocab_size()))
    elif "pos_embed" in state and state["pos_embed"].shape[-1] != into.cfg.width:
        raise ValueError(f"{path}: its image encoder is {state['pos_embed'].shape[-1]} wide, this model's "
                         f"{into.cfg.width}: choose the file's preset (the released maco.pth is --preset base)")
    report = load_state(into, state, str(path))
    if verbose:
        print(report)
    return into.to(device).eval(), tokenizer


def _from_train_checkpoint(checkpoint: dict, path, tokenizer, device) -> tuple[MaCo, Tokenizer]:
    missing = [key for key in TRAIN_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"weights {path}: a train.py checkpoint without {missing}")
    unknown = set(checkpoint["model_config"]) - {f.name for f in fields(MaCoConfig)}
    if unknown:
        raise ValueError(f"{path} has model settings this code does not know: {sorted(unknown)}")
    model = MaCo(MaCoConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    own = Tokenizer.from_str(checkpoint["tokenizer"])
    check_special_tokens(own, str(path))
    if tokenizer is not None and as_tokenizer(tokenizer).get_vocab() != own.get_vocab():
        raise ValueError(f"{path} is a train.py checkpoint with its own tokenizer, and the tokenizer given "
                         f"({tokenizer}) has another vocabulary; leave the tokenizer (--tokenizer) out")
    return model.to(device).eval(), own


def _copy_whole_model(into: MaCo, source: MaCo, path) -> None:
    """Every tensor of a train.py checkpoint's model into `into`; shapes that differ are an error naming them."""
    own = into.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in source.state_dict().items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{path}: this train.py checkpoint's model has other shapes than the one being trained "
                         f"(start with its settings):\n  " + "\n  ".join(mismatched))
    into.load_state_dict(source.state_dict())


def _released_config(state: dict, preset: str | None = None, **settings) -> MaCoConfig:
    """The model a released file holds: `preset` (None: the preset of the file's image and text widths, `base` for
    maco.pth) with `settings`, and the super-resolution target read from `decoder_pred`'s shape: (2p)^2 C values
    per patch with the target, p^2 C without. Any other decoder_pred shape is an error naming both."""
    if preset is None:
        widths = tuple(state[key].shape[-1] if key in state else None for key in released.WIDTH_KEYS)
        fitting = [name for name, cfg in ((name, MaCoConfig.preset(name)) for name in PRESETS)
                   if widths == (cfg.width, cfg.text_width)]
        preset = fitting[0] if fitting else "base"  # none fits: `load_state` lists the shapes that differ
    cfg = MaCoConfig.preset(preset, **settings)
    if "decoder_pred.weight" not in state:
        return cfg  # `load_state` reports the missing key
    found = tuple(state["decoder_pred.weight"].shape)
    for super_resolution in (True, False):
        candidate = replace(cfg, super_resolution=super_resolution)
        if found[0] == candidate.target_patch_size ** 2 * cfg.in_chans:
            return candidate
    wanted = " or ".join(f"{((cfg.patch_size * factor) ** 2 * cfg.in_chans, cfg.decoder_width)} "
                         f"({'with' if factor == 2 else 'without'} the super-resolution target)" for factor in (2, 1))
    raise ValueError(f"decoder_pred.weight: file {found} vs model {wanted} (`{preset}` preset)")


def _load_mae_encoder(model: MaCo, checkpoint: dict, path) -> str:
    """MAE's ImageNet ViT checkpoint (a dict under "model", timm names) into model.image_encoder (D12). Returns a
    report of the keys loaded, missing and ignored. A shape mismatch is an error, never a silent skip, and so is a
    file none of whose tensors belongs to the image encoder."""
    state = checkpoint.get("model", checkpoint)  # MAE nests the state dict under "model"
    if not isinstance(state, dict):
        raise ValueError(f"--init {path}: expected a state dict under the key 'model', got {type(state).__name__}")
    own = model.image_encoder.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"--init {path} does not fit this image encoder (use --preset base):\n  " + "\n  ".join(mismatched))
    loaded = [k for k in state if k in own]
    ignored = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if not loaded:
        raise ValueError(f"--init {path}: none of its {len(state)} tensors belongs to the image encoder (MAE's "
                         f"names: {', '.join(list(own)[:3])}, ...); expected MAE's mae_pretrain_vit_base.pth or "
                         f"the released maco.pth")
    model.image_encoder.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return (f"--init {path}: loaded {len(loaded)} of {len(own)} image-encoder tensors"
            + (f"; missing (kept at init): {missing}" if missing else "")
            + (f"; ignored (not in the encoder): {ignored}" if ignored else ""))
