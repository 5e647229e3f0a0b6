"""A compact Vision Transformer with MAE-style random patch masking: the image side of MaCo.

docs/method.md §2 (decision D1). Pre-LayerNorm blocks, fixed 2-D sine-cosine position embeddings,
attention through `scaled_dot_product_attention`. Parameter names follow the common ViT convention
(`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.attn.qkv`, ...) so that an MAE or timm ViT-B/16
encoder state dict loads by name, strictly.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Patches, masking and position embeddings: small named functions a reader can test in isolation.

def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs (B, C, H, W) -> (B, L, p*p*C), L = (H/p)(W/p) row-major; a patch vector is ordered
    (row-in-patch, column-in-patch, channel), channel fastest."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)  # (B, C, h, a, w, t)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, a, t, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """The inverse of `patchify` for a square grid: (B, L, p*p*C) -> (B, C, H, W)."""
    B, L, _ = x.shape
    h = w = int(round(L ** 0.5))
    assert h * w == L, f"unpatchify needs a square grid of patches, got L = {L}"
    x = x.reshape(B, h, w, p, p, channels)  # (B, h, w, a, t, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, a, w, t)
    return x.reshape(B, channels, h * p, w * p)


def random_masking(tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
    """Keep a random subset of int(L * (1 - mask_ratio)) tokens per sample.

    tokens: (B, L, D). Returns
      kept:        (B, K, D) the kept tokens, in shuffled order
      mask:        (B, L) in the original patch order, 1 = removed (masked), 0 = kept
      ids_restore: (B, L) indices that undo the shuffle: gather([kept, removed], ids_restore) is the original order
    """
    B, L, D = tokens.shape
    num_keep = int(L * (1 - mask_ratio))
    noise_device = generator.device if generator is not None else tokens.device
    noise = torch.rand(B, L, generator=generator, device=noise_device).to(tokens.device)  # (B, L) in [0, 1)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the smallest num_keep noises are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :num_keep]  # (B, K)
    kept = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
    mask = torch.ones(B, L, device=tokens.device)
    mask[:, :num_keep] = 0
    mask = mask.gather(1, ids_restore)  # (B, L) back in the original order
    return kept, mask, ids_restore


def sincos_1d(width: int, positions: torch.Tensor) -> torch.Tensor:
    """positions (M,) -> (M, width): [sin(u * w_k), cos(u * w_k)], w_k = 10000^(-k / (width/2)), k < width/2."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))  # (width/2,)
    angles = positions.double()[:, None] * omega[None, :]  # (M, width/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_pos_embed(width: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine table (1, 1 + grid_size**2, width); row 0 (the cls slot) is zero.

    Patch (row i, column j), numbered n = i * grid_size + j, gets [sincos_1d(j), sincos_1d(i)]: column half first.
    """
    assert width % 4 == 0, "2-D sin-cos position embeddings need a width divisible by 4"
    coords = torch.arange(grid_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each
    table = torch.cat([sincos_1d(width // 2, cols.flatten()), sincos_1d(width // 2, rows.flatten())], dim=1)  # (g*g, width)
    table = torch.cat([torch.zeros(1, width, dtype=table.dtype), table], dim=0)  # (1 + g*g, width)
    return table.float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------
# Transformer blocks

class Attention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch x (B, ...): in training, each sample's whole branch is zeroed with
    probability `rate` and the kept ones are scaled by 1 / (1 - rate), so the expected output is unchanged.
    The identity in eval mode or at rate 0 (then no random number is drawn)."""
    if rate == 0.0 or not training:
        return x
    keep = (torch.rand(x.shape[0], *(1,) * (x.dim() - 1), device=x.device) >= rate).to(x.dtype)  # (B, 1, ...)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x += DropPath(Attn(LN1 x)); x += DropPath(MLP(LN2 x)).
    drop_path_rate 0 (the default, pretraining) leaves it a plain block; fine-tuning sets it (finetune.py)."""

    def __init__(self, width, num_heads, mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


def init_vit_weights(module):
    """As released (MAE practice): Linear Xavier-uniform with zero bias; LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, width):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs):
        return self.proj(imgs).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, D, h, w) -> (B, L, D)


class VisionTransformer(nn.Module):
    """ViT encoder. forward(imgs (B, C, S, S), mask_ratio) -> (h, mask, ids_restore):
    h (B, 1 + K, D) after the final LayerNorm (cls first), mask (B, L) 1 = removed, ids_restore (B, L).
    With mask_ratio = 0 every patch is kept in its original order (evaluation). drop_path: the stochastic-depth
    rate of the last block (see set_drop_path); 0 in pretraining."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, width=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path=0.0):
        super().__init__()
        self.patch_size, self.grid_size = patch_size, img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # a persistent buffer, not a parameter: fixed, yet saved so a checkpoint brings its own table
        self.register_buffer("pos_embed", sincos_2d_pos_embed(width, self.grid_size))
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.apply(init_vit_weights)
        # the patch embedding is initialised like a Linear on its flattened (D, C*p*p) view
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(width, -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.set_drop_path(drop_path)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly over depth, from 0 at the first block to `rate` at the last (the common
        ViT practice; the released fine-tuning uses 0.1, docs/method.md §10). Settable on a loaded encoder."""
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path_rate = rate * i / max(depth - 1, 1)

    def forward(self, imgs, mask_ratio: float = 0.0, generator: torch.Generator | None = None):
        x = self.patch_embed(imgs)  # (B, L, D)
        B, L, D = x.shape
        if L != self.pos_embed.shape[1] - 1:
            raise ValueError(f"image of side {imgs.shape[-1]} gives {L} patches; this encoder expects "
                             f"{self.grid_size * self.patch_size}x{self.grid_size * self.patch_size} images")
        x = x + self.pos_embed[:, 1:]
        if mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio, generator)  # (B, K, D)
        else:
            mask = torch.zeros(B, L, device=x.device)
            ids_restore = torch.arange(L, device=x.device).expand(B, L)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + K, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore
