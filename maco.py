"""MaCo: masked image modelling plus correlation-weighted image-report contrast, wired together.

docs/method.md §1-§6 (decisions D1-D5). One forward pass:
  1. the image (2S x 2S with the super-resolution target) is downsampled to S x S and half its patches are masked;
  2. the ViT encodes the visible patches; a light decoder predicts every masked patch of the full-size image;
  3. the visible patch tokens, projected and averaged, meet the report embedding in a contrastive loss whose
     per-pair weight is softplus of a linear function of *which* patches were visible (the correlation head).
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from checkpoint import read_checkpoint
from cli import check_options, flag, option
from loss import clip_loss, correlation_weighted_contrastive_loss, reconstruction_loss
from text_encoder import TextEncoder
from tokenizer import check_special_tokens
from vit import Block, VisionTransformer, init_vit_weights, patchify, sincos_2d_pos_embed


@dataclass
class MaCoConfig:
    """The model's shapes and objectives. Defaults are `base` (the paper's and the released checkpoint's shapes);
    `MaCoConfig.preset("tiny")` is the CPU preset. Every field is a flag of train.py (`--img-size`, ...)."""
    # image encoder (ViT)
    img_size: int = option(224, "encoder input side S in pixels (the training input is 2S with super-resolution)",
                           minimum=1)
    patch_size: int = option(16, "ViT patch side p; the grid has (S/p)^2 patches", minimum=1)
    in_chans: int = option(3, "image channels (the grey image is replicated)", minimum=1)
    width: int = option(768, "image encoder width", minimum=4)
    depth: int = option(12, "image encoder blocks", minimum=1)
    num_heads: int = option(12, "image encoder attention heads", minimum=1)
    mlp_ratio: float = option(4.0, "MLP hidden width / width, encoder and decoder", above=0)
    # decoder
    decoder_width: int = option(768, "reconstruction decoder width", minimum=4)
    decoder_depth: int = option(4, "reconstruction decoder blocks", minimum=1)
    decoder_num_heads: int = option(6, "reconstruction decoder attention heads", minimum=1)
    # text encoder (BERT-style) and the joint embedding
    vocab_size: int = option(30000, "text vocabulary size (training sets it from the tokenizer)", minimum=5)
    text_width: int = option(384, "text encoder width", minimum=1)
    text_depth: int = option(6, "text encoder layers", minimum=1)
    text_num_heads: int = option(6, "text encoder attention heads", minimum=1)
    text_ffn_width: int = option(1536, "text encoder feed-forward width", minimum=1)
    max_len: int = option(100, "report tokens, [CLS] included (longer reports are truncated)", minimum=2)
    text_dropout: float = option(0.1, "dropout in the text encoder", minimum=0, below=1)
    embed_dim: int = option(768, "joint image-report embedding width", minimum=1)
    # objectives
    super_resolution: bool = option(True, "D2: predict (2p)x(2p) patches of a 2S x 2S input")
    mask_ratio: float = option(0.5, "fraction of patches masked; 0 = contrastive learning alone", minimum=0, below=1)
    lam: float = option(0.5, "D3: loss = lam * L_rec + (1 - lam) * L_con", minimum=0, maximum=1)
    norm_pix_loss: bool = option(False, "normalise each target patch (off in MaCo's recipe)")
    correlation_weighting: bool = option(True, "D5: correlation-weighted loss; off = plain symmetric InfoNCE")
    logit_scale_init: float = option(1 / 0.03, "D4: initial raw inverse temperature", above=0)
    logit_scale_max: float = option(100.0, "D4: the inverse temperature is clamped at this value", above=0)

    def __post_init__(self):
        check_options(self)
        divisible = [("img_size", "patch_size"), ("width", "num_heads"), ("decoder_width", "decoder_num_heads"),
                     ("text_width", "text_num_heads")]
        for a, b in divisible:
            if getattr(self, a) % getattr(self, b):
                raise ValueError(f"{flag(a)} {getattr(self, a)} must be a multiple of {flag(b)} {getattr(self, b)}")
        for name in ("width", "decoder_width"):  # the 2-D sine-cosine position tables
            if getattr(self, name) % 4:
                raise ValueError(f"{flag(name)} {getattr(self, name)} must be a multiple of 4")
        if self.num_patches * (1 - self.mask_ratio) < 1:
            raise ValueError(f"--mask-ratio {self.mask_ratio} leaves no visible patch of {self.num_patches}")

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
        if cfg.correlation_weighting:
            correlation_weights = F.softplus(correlation_scores)  # (G,) c = log(1 + e^r), computed stably
            loss_con = correlation_weighted_contrastive_loss(image_emb, text_emb, correlation_weights, logit_scale)
        else:
            correlation_weights = torch.ones_like(correlation_scores)
            loss_con = clip_loss(image_emb, text_emb, logit_scale)
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


TRAIN_CHECKPOINT_KEYS = ("model", "model_config", "tokenizer")  # what building a model needs from a train.py file


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by train.py: returns (model in eval mode, tokenizer, the checkpoint dict)."""
    checkpoint = read_checkpoint(path, "checkpoint", required=TRAIN_CHECKPOINT_KEYS)
    model, tokenizer = from_checkpoint(checkpoint, path)
    return model.to(device).eval(), tokenizer, checkpoint


def from_checkpoint(checkpoint: dict, path) -> tuple[MaCo, Tokenizer]:
    """The model (in eval mode) and tokenizer of a train.py checkpoint already read; `path` is for messages."""
    unknown = set(checkpoint["model_config"]) - {f.name for f in fields(MaCoConfig)}
    if unknown:
        raise ValueError(f"{path} has model settings this code does not know: {sorted(unknown)}")
    cfg = MaCoConfig(**checkpoint["model_config"])
    model = MaCo(cfg)
    model.load_state_dict(checkpoint["model"])
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
    check_special_tokens(tokenizer, str(path))
    return model.eval(), tokenizer


def load_released(path, tokenizer_path, device="cpu", preset: str | None = None):
    """The released weights (`maco.pth`) and tokenizer (`mimic_wordpiece.json`) of github.com/SZUHvern/MaCo ->
    (MaCo in eval mode, tokenizer). Every key is mapped and checked, and what is dropped is printed: released.py."""
    import released  # here, not at the top: released.py builds on this module
    return released.load_released(path, tokenizer_path, device, preset)


def load(path, tokenizer=None, device="cpu"):
    """Any MaCo weights file -> (MaCo in eval mode, tokenizer): a train.py checkpoint, which carries its
    tokenizer, or the released maco.pth, which needs `tokenizer` (the released mimic_wordpiece.json)."""
    import released
    return released.load(path, tokenizer, device)


def load_mae_encoder(model: MaCo, path, checkpoint: dict | None = None) -> str:
    """Load MAE's ImageNet ViT checkpoint (a dict under "model", timm names) into model.image_encoder (D12).
    `checkpoint`: the file's contents if already read.

    Returns a report of the keys loaded, missing and ignored. A shape mismatch is an error, never a silent skip,
    and so is a file none of whose tensors belongs to the image encoder.
    """
    checkpoint = read_checkpoint(path, "--init") if checkpoint is None else checkpoint
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
