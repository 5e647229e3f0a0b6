"""backbone.py: the released feature levels at any depth, bicubic position tables on a new grid, the dense maps
of the requested blocks (the last one equals the encoder's own output without its final norm), and the
layer-wise learning-rate decay groups with the released layer ids and weight-decay exemptions; a trainable
position table; a sequence without the cls token."""
import pytest
import torch
import torch.nn as nn

from backbone import ViTBackbone, block_indices_for, layer_decay_groups, new_encoder, pos_embed_grid, resize_pos_embed
from maco import MaCoConfig


def tiny_encoder():
    torch.manual_seed(0)
    return new_encoder(MaCoConfig.preset("tiny")).eval()


def test_block_indices_keep_the_released_relative_depths():
    assert block_indices_for(12) == (3, 5, 7, 11)  # blocks 4, 6, 8 and 12 of ViT-B, as released
    assert block_indices_for(4) == (0, 1, 2, 3)  # tiny: 4/3, 2, 8/3, 4 of 4 blocks, rounded
    assert block_indices_for(24) == (7, 11, 15, 23)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        block_indices_for(2)


def test_resize_pos_embed_keeps_the_cls_slot_and_interpolates_the_patch_table():
    encoder = tiny_encoder()
    rows, cols = 8, 8
    width = encoder.pos_embed.shape[-1]
    # a table that depends on the column only, and a cls row of its own
    column_values = torch.randn(1, 1, cols, width)
    table = torch.cat([torch.full((1, 1, width), 3.0), column_values.expand(1, rows, cols, width).reshape(1, -1, width)],
                      dim=1)  # (1, 1 + 64, D)
    encoder.pos_embed.copy_(table)
    resize_pos_embed(encoder, (16, 8))  # twice the rows, the same columns
    assert encoder.pos_embed.shape == (1, 1 + 16 * 8, width)
    assert pos_embed_grid(encoder) == (16, 8)
    assert torch.equal(encoder.pos_embed[:, 0], table[:, 0])
    patches = encoder.pos_embed[:, 1:].reshape(16, 8, width)  # (rows, cols, D)
    # constant along the rows, and at an unchanged number of columns bicubic interpolation is the identity
    assert torch.allclose(patches, column_values.reshape(1, cols, width).expand(16, cols, width), atol=1e-5)
    # still a persistent buffer, not a parameter: it is saved with the weights, in its new shape
    assert "pos_embed" not in dict(encoder.named_parameters())
    assert encoder.state_dict()["pos_embed"].shape == (1, 129, width)


def test_a_trainable_position_table_is_a_parameter_that_learns_under_the_same_key():
    encoder = tiny_encoder()
    before = encoder.pos_embed.clone()
    resize_pos_embed(encoder, (8, 8), trainable=True)  # the same grid: only made trainable
    assert isinstance(encoder.pos_embed, nn.Parameter) and torch.equal(encoder.pos_embed.detach(), before)
    assert "pos_embed" in dict(encoder.named_parameters()) and "pos_embed" in encoder.state_dict()
    ViTBackbone(encoder, (3,))(torch.randn(1, 1, 64, 64))[0].square().mean().backward()
    assert encoder.pos_embed.grad is not None and encoder.pos_embed.grad.abs().sum() > 0
    resize_pos_embed(encoder, (16, 8), trainable=True)  # resizing a trainable table keeps it trainable
    assert isinstance(encoder.pos_embed, nn.Parameter) and encoder.pos_embed.shape[1] == 1 + 16 * 8
    fixed = tiny_encoder()
    resize_pos_embed(fixed, (16, 8))
    fixed.load_state_dict(encoder.state_dict())  # weights save and load across the two kinds
    assert torch.equal(fixed.pos_embed, encoder.pos_embed.detach())


def test_without_the_cls_token_the_maps_ignore_it():
    encoder = tiny_encoder()
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        with_cls, without = ViTBackbone(encoder, (3,))(images)[0], ViTBackbone(encoder, (3,), cls_token=False)(images)[0]
        encoder.cls_token.add_(1.0)
        assert torch.equal(ViTBackbone(encoder, (3,), cls_token=False)(images)[0], without)
        assert not torch.allclose(ViTBackbone(encoder, (3,))(images)[0], with_cls)  # the cls token is attended to
    assert without.shape == with_cls.shape == (2, 192, 8, 8)


def test_resize_pos_embed_to_the_same_grid_changes_nothing():
    encoder = tiny_encoder()
    before = encoder.pos_embed.clone()
    resize_pos_embed(encoder, (8, 8))
    assert torch.equal(encoder.pos_embed, before)


@pytest.mark.parametrize("preset, size", [("tiny", (64, 96)), ("base", (32, 48))])
def test_backbone_returns_the_patch_tokens_of_each_requested_block_as_maps(preset, size):
    torch.manual_seed(0)
    cfg = MaCoConfig.preset(preset)
    encoder = new_encoder(cfg).eval()
    p = cfg.patch_size
    resize_pos_embed(encoder, (size[0] // p, size[1] // p))
    blocks = block_indices_for(cfg.depth)
    backbone = ViTBackbone(encoder, blocks)
    assert (backbone.width, backbone.patch_size) == (cfg.width, p)
    images = torch.randn(2, cfg.in_chans, *size)
    with torch.no_grad():
        maps = backbone(images)
    assert [m.shape for m in maps] == [(2, cfg.width, size[0] // p, size[1] // p)] * 4
    # the last level is the last block's output: the encoder's own forward, without its final LayerNorm
    encoder.norm = nn.Identity()
    with torch.no_grad():
        tokens, _, _ = encoder(images)  # (B, 1 + L, D)
    assert torch.allclose(maps[-1], tokens[:, 1:].transpose(1, 2).reshape(maps[-1].shape), atol=1e-5)


def test_backbone_returns_maps_in_the_requested_order_and_rejects_bad_inputs():
    encoder = tiny_encoder()
    images = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        first, last = ViTBackbone(encoder, (0, 3))(images)
        swapped = ViTBackbone(encoder, (3, 0))(images)
    assert torch.equal(swapped[0], last) and torch.equal(swapped[1], first)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        ViTBackbone(encoder, (0, 3))(torch.randn(1, 1, 64, 60))
    with pytest.raises(ValueError, match=r"resize_pos_embed\(encoder, \(12, 8\)\)"):
        ViTBackbone(encoder, (0, 3))(torch.randn(1, 1, 96, 64))
    with pytest.raises(ValueError, match="0..3"):
        ViTBackbone(encoder, (1, 4))


def test_layer_decay_groups_place_every_parameter_once_with_the_released_scale():
    encoder = tiny_encoder()  # depth 4
    head = nn.Sequential(nn.Conv2d(192, 8, 1), nn.BatchNorm2d(8))
    groups = layer_decay_groups(encoder, head, weight_decay=0.05, layer_decay=0.65)
    placed = [id(p) for group in groups for p in group["params"]]
    everything = list(encoder.parameters()) + list(head.parameters())
    assert sorted(placed) == sorted(map(id, everything))  # each parameter in exactly one group
    of = {name: group for group in groups for name in group["names"]}
    assert of["encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65 ** 5)
    assert of["encoder.cls_token"]["lr_scale"] == pytest.approx(0.65 ** 5)
    assert of["encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** 4)
    assert of["encoder.blocks.3.mlp.fc2.weight"]["lr_scale"] == pytest.approx(0.65)
    assert of["encoder.norm.weight"]["lr_scale"] == 1.0 and of["others.0.weight"]["lr_scale"] == 1.0
    decayed = {name for name, group in of.items() if group["weight_decay"] == 0.05}
    assert decayed == {"encoder.patch_embed.proj.weight", "others.0.weight"} | {
        f"encoder.blocks.{i}.{layer}.weight" for i in range(4) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert of["encoder.cls_token"]["weight_decay"] == 0.0 and of["encoder.blocks.2.norm1.weight"]["weight_decay"] == 0.0
    torch.optim.AdamW(groups, lr=1e-3)  # the groups are what AdamW takes


def test_layer_decay_groups_take_the_whole_model_as_others_without_duplicates():
    encoder = tiny_encoder()
    model = nn.ModuleDict(dict(encoder=encoder, head=nn.Linear(192, 2)))
    groups = layer_decay_groups(encoder, model, weight_decay=0.05, layer_decay=0.65)
    placed = [id(p) for group in groups for p in group["params"]]
    assert len(placed) == len(set(placed)) == len(list(model.parameters()))
    of = {name: group for group in groups for name in group["names"]}
    assert of["encoder.blocks.1.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** 3)


def test_the_released_mmseg_layer_ids_leave_every_block_undecayed():
    encoder = tiny_encoder()  # depth 4: stock mmseg's num_layers = 4 + 2, patch embedding 0.65^(6 - 0 - 1)
    of = {name: group for group in layer_decay_groups(encoder, nn.Linear(2, 2), 0.05, 0.65, layer_ids="released_mmseg")
          for name in group["names"]}
    assert of["encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == of["encoder.blocks.3.mlp.fc2.weight"]["lr_scale"] == 1.0
    assert of["encoder.patch_embed.proj.weight"]["lr_scale"] == of["encoder.cls_token"]["lr_scale"] == pytest.approx(
        0.65 ** 5)


def test_the_three_weight_decay_exemption_rules():
    encoder = tiny_encoder()
    resize_pos_embed(encoder, (8, 8), trainable=True)
    head = nn.Sequential(nn.Conv2d(192, 8, 1), nn.LayerNorm(8))  # a head's LayerNorm (ViTDet's pyramid "LN")

    def exempt(rule):
        return {name for group in layer_decay_groups(encoder, head, 0.05, 0.65, decay_exempt=rule)
                for name in group["names"] if group["weight_decay"] == 0.0}
    ours, mmseg, vitdet = (exempt(rule) for rule in ("norms_biases_tokens", "released_mmseg", "released_vitdet"))
    assert ours - mmseg == {"encoder.cls_token", "encoder.pos_embed"}  # the released check never matched them
    assert mmseg - ours == set()
    encoder_norms = {f"encoder.{n}" for n, _ in encoder.named_parameters() if "norm" in n}
    assert vitdet == encoder_norms | {"encoder.pos_embed"}  # biases, cls token and the head's LayerNorm decayed
    assert {"others.0.bias", "others.1.weight", "encoder.blocks.0.attn.qkv.bias"} <= ours - vitdet
    with pytest.raises(ValueError, match="decay_exempt 'none'"):
        layer_decay_groups(encoder, head, 0.05, 0.65, decay_exempt="none")
