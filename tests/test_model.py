"""Properties of the image encoder, text encoder, tokenizer and the assembled model (docs/method.md §2-§4, §6)."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from loss import clip_loss
from maco import MaCo, MaCoConfig, caption_keys
from text_encoder import TextEncoder
from util.tokenizer import encode_texts, load_tokenizer, save_tokenizer, train_tokenizer
from vit import VisionTransformer, drop_path, patchify, random_masking, sincos_2d_pos_embed, unpatchify

REPORTS = ["Heart size is normal. Nodule measures 1.5 cm in the right upper lobe.",
           "No pleural effusion or pneumothorax. The lungs are clear.",
           "Small left pleural effusion. Patchy opacity in the right lower lobe, concerning for pneumonia."] * 5


# -- masking, patches, position embeddings -------------------------------------------------------------------

@pytest.mark.parametrize("mask_ratio", [0.25, 0.5, 0.75, 0.9])
def test_masking_keeps_int_L_times_one_minus_ratio_tokens_and_ids_restore_inverts_the_shuffle(mask_ratio):
    B, L, D = 4, 49, 6
    tokens = torch.randn(B, L, D)
    kept, mask, ids_restore = random_masking(tokens, mask_ratio, torch.Generator().manual_seed(0))
    num_keep = int(L * (1 - mask_ratio))
    assert kept.shape == (B, num_keep, D)
    assert torch.all(mask.sum(dim=1) == L - num_keep)
    ids_shuffle = ids_restore.argsort(dim=1)
    removed = tokens.gather(1, ids_shuffle[:, num_keep:, None].expand(-1, -1, D))
    restored = torch.cat([kept, removed], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, D))
    assert torch.equal(restored, tokens)
    # mask is in the original order: 0 exactly where a kept token came from
    for b in range(B):
        kept_positions = set(ids_shuffle[b, :num_keep].tolist())
        assert kept_positions == set(torch.nonzero(mask[b] == 0).flatten().tolist())


def test_masking_differs_per_sample_and_is_reproducible_with_a_generator():
    tokens = torch.randn(8, 64, 4)
    _, mask_a, _ = random_masking(tokens, 0.5, torch.Generator().manual_seed(3))
    _, mask_b, _ = random_masking(tokens, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(mask_a, mask_b)
    assert len({tuple(row.tolist()) for row in mask_a}) == 8


@pytest.mark.parametrize("p", [16, 32])
def test_patchify_and_unpatchify_are_inverse(p):
    imgs = torch.randn(2, 3, 4 * p, 4 * p)
    patches = patchify(imgs, p)
    assert patches.shape == (2, 16, p * p * 3)
    assert torch.equal(unpatchify(patches, p, 3), imgs)
    assert torch.equal(patchify(unpatchify(patches, p, 3), p), patches)


def test_patch_vector_order_is_row_in_patch_then_column_then_channel():
    imgs = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)  # C = 2, two 2x2-patch rows
    patches = patchify(imgs, 2)
    i, j, a, t, c = 1, 0, 1, 0, 1  # patch row 1, column 0; pixel row 1, column 0 of it; channel 1
    assert patches[0, i * 2 + j, (a * 2 + t) * 2 + c] == imgs[0, c, i * 2 + a, j * 2 + t]


def test_sincos_table_matches_hand_computed_values():
    table = sincos_2d_pos_embed(width=8, grid_size=3)  # per-axis width 4: frequencies 1 and 0.01
    assert table.shape == (1, 10, 8)
    assert torch.all(table[0, 0] == 0)  # the cls slot
    # patch (row 0, col 0), n = 0: [sin 0, sin 0, cos 0, cos 0] twice
    assert torch.allclose(table[0, 1], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    # patch (row 1, col 2), n = 5: column half [sin 2, sin .02, cos 2, cos .02], then row half at 1
    expected = torch.tensor([0.909297, 0.019999, -0.416147, 0.999800, 0.841471, 0.010000, 0.540302, 0.999950])
    assert torch.allclose(table[0, 6], expected, atol=1e-6)


def test_encoder_without_masking_keeps_every_token_in_order():
    vit = VisionTransformer(img_size=32, patch_size=8, in_chans=1, width=16, depth=1, num_heads=2)
    h, mask, ids_restore = vit(torch.randn(2, 1, 32, 32))
    assert h.shape == (2, 17, 16) and mask.sum() == 0
    assert torch.equal(ids_restore, torch.arange(16).expand(2, 16))


def test_drop_path_is_the_identity_in_eval_and_drops_whole_residual_branches_per_sample_in_training():
    torch.manual_seed(0)
    x = torch.randn(400, 5, 6) + 3.0  # no zeros, so a zeroed entry can only come from a dropped branch
    state = torch.get_rng_state()
    assert torch.equal(drop_path(x, 0.25, training=False), x) and torch.equal(drop_path(x, 0.0, training=True), x)
    assert torch.equal(torch.get_rng_state(), state)  # rate 0 or eval draws nothing: pretraining's RNG is untouched
    ratio = drop_path(x, 0.25, training=True) / x  # per sample: 0 everywhere, or 1 / (1 - 0.25) everywhere
    dropped = (ratio == 0).flatten(1).all(1)
    kept = torch.isclose(ratio, torch.tensor(4 / 3)).flatten(1).all(1)
    assert torch.all(dropped ^ kept)
    assert 0.15 < dropped.float().mean() < 0.35  # about a quarter of the samples


def test_encoder_drop_path_rises_linearly_over_depth_and_changes_nothing_in_eval_mode():
    torch.manual_seed(0)
    plain = VisionTransformer(img_size=32, patch_size=8, in_chans=1, width=16, depth=5, num_heads=2)
    deep = VisionTransformer(img_size=32, patch_size=8, in_chans=1, width=16, depth=5, num_heads=2, drop_path=0.1)
    assert [b.drop_path_rate for b in plain.blocks] == [0.0] * 5
    assert [b.drop_path_rate for b in deep.blocks] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    deep.load_state_dict(plain.state_dict())
    imgs = torch.randn(3, 1, 32, 32)
    assert torch.equal(deep.eval()(imgs)[0], plain.eval()(imgs)[0])
    deep.set_drop_path(0.9)
    assert not torch.equal(deep.train()(imgs)[0], plain.train()(imgs)[0])


def test_mae_named_state_dict_loads_strictly_into_the_encoder():
    """Keys and shapes of MAE's `mae_pretrain_vit_base.pth` encoder (timm names), written out independently."""
    width, hidden = 768, 3072
    state = {"cls_token": torch.randn(1, 1, width), "pos_embed": torch.randn(1, 197, width),
             "patch_embed.proj.weight": torch.randn(width, 3, 16, 16), "patch_embed.proj.bias": torch.randn(width),
             "norm.weight": torch.randn(width), "norm.bias": torch.randn(width)}
    for i in range(12):
        for name, shape in [("norm1.weight", (width,)), ("norm1.bias", (width,)),
                            ("attn.qkv.weight", (3 * width, width)), ("attn.qkv.bias", (3 * width,)),
                            ("attn.proj.weight", (width, width)), ("attn.proj.bias", (width,)),
                            ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                            ("mlp.fc1.weight", (hidden, width)), ("mlp.fc1.bias", (hidden,)),
                            ("mlp.fc2.weight", (width, hidden)), ("mlp.fc2.bias", (width,))]:
            state[f"blocks.{i}.{name}"] = torch.randn(shape)
    model = MaCo(MaCoConfig.preset("base"))
    model.image_encoder.load_state_dict(state, strict=True)
    assert torch.equal(model.image_encoder.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])


def test_base_parameter_counts_match_the_paper_shapes():
    model = MaCo(MaCoConfig.preset("base"))
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())
    # timm's ViT-B/16 has 85,798,656 parameters, of which the 197 x 768 position table is fixed here (a buffer)
    assert count(model.image_encoder) == 85_798_656 - 197 * 768
    block = lambda w, hidden: 4 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * hidden + hidden) + (hidden * w + w)
    decoder = (768 * 768 + 768) + 4 * block(768, 3072) + 2 * 768 + (768 * 3072 + 3072) + 768  # pred: 32*32*3
    assert count(model.decoder_embed, model.decoder_blocks, model.decoder_norm, model.decoder_pred) \
        + model.mask_token.numel() == decoder
    bert_layer = 4 * (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384) + 4 * 384
    text = (30000 + 100 + 2) * 384 + 2 * 384 + 6 * bert_layer + (384 * 768 + 768)
    assert count(model.text_encoder) == text
    assert model.text_encoder.pooler.weight.shape == (768, 384)  # the released checkpoint's pooler (issue #4)
    assert count(model.image_proj, model.correlation_head) + 1 == (768 * 768 + 768) + (196 + 1) + 1


# -- text encoder and tokenizer ------------------------------------------------------------------------------

def test_padding_does_not_change_text_embedding():
    torch.manual_seed(0)
    encoder = TextEncoder(vocab_size=50, width=32, depth=2, num_heads=4, ffn_width=64, max_len=100,
                          embed_dim=48).eval()
    ids = torch.tensor([[2, 7, 9, 11, 13, 5, 8, 21, 30, 4, 6, 17]])
    own_length = encoder(ids, torch.ones_like(ids))
    padded_ids = torch.zeros(1, 100, dtype=torch.long)
    padded_ids[0, :12] = ids
    padded_mask = (padded_ids != 0).long()
    padded_mask[0, 0] = 1
    assert torch.allclose(own_length, encoder(padded_ids, padded_mask), atol=1e-6)
    assert own_length.shape == (1, 48) and own_length.abs().max() < 1


def test_tokenizer_has_released_special_ids_and_keeps_decimals_as_digit_groups():
    tokenizer = train_tokenizer(REPORTS, vocab_size=200)
    assert [tokenizer.token_to_id(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[MASK]"]] == [0, 1, 2, 3]
    assert tokenizer.encode("1.5 cm").tokens == ["[CLS]", "1", ".", "5", "cm"]
    assert tokenizer.encode("Pleural Effusion").tokens == tokenizer.encode("pleural effusion").tokens


def test_tokenizer_training_is_deterministic_and_keeps_frequent_words_whole():
    first, second = train_tokenizer(REPORTS, vocab_size=300), train_tokenizer(list(REPORTS), vocab_size=300)
    assert first.to_str() == second.to_str()
    assert first.encode("pleural effusion").tokens == ["[CLS]", "pleural", "effusion"]
    # a word outside the vocabulary is split into known pieces, not lost
    assert first.encode("effusions").tokens == ["[CLS]", "effusion", "##s"]


def test_encode_texts_pads_dynamically_to_the_longest_text_and_truncates_at_max_len(tmp_path):
    tokenizer = train_tokenizer(REPORTS, vocab_size=200)
    save_tokenizer(tokenizer, tmp_path / "tok.json")
    tokenizer = load_tokenizer(tmp_path / "tok.json")
    batch = encode_texts(tokenizer, ["no effusion.", "heart size is normal. the lungs are clear."], max_len=100)
    lengths = [len(tokenizer.encode(t).ids) for t in ["no effusion.", "heart size is normal. the lungs are clear."]]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert torch.all(batch["input_ids"][:, 0] == 2)  # [CLS] first, once
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == 0)
    assert encode_texts(tokenizer, [" ".join(["lungs"] * 300)], max_len=100)["input_ids"].shape == (1, 100)


def test_released_style_tokenizer_file_loads_unchanged_and_gets_one_cls(tmp_path):
    """The released mimic_wordpiece.json has no post-processor: it was fed '[CLS] ' + caption."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[MASK]": 3, "there": 4, "is": 5, "pneumo": 6, "##thorax": 7, ".": 8}
    released = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    released.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()])
    released.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits()])
    released.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[MASK]"])
    released.save(str(tmp_path / "mimic_wordpiece.json"))
    loaded = load_tokenizer(tmp_path / "mimic_wordpiece.json")
    assert loaded.to_str() == Tokenizer.from_file(str(tmp_path / "mimic_wordpiece.json")).to_str()
    assert loaded.encode("[CLS] There is pneumothorax. ").ids == [2, 4, 5, 6, 7, 8]
    assert encode_texts(loaded, ["There is pneumothorax. "])["input_ids"].tolist() == [[2, 4, 5, 6, 7, 8]]


def test_tokenizer_with_wrong_special_ids_is_rejected(tmp_path):
    wrong = Tokenizer(models.WordPiece({"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[MASK]": 3}, unk_token="[UNK]"))
    wrong.save(str(tmp_path / "wrong.json"))
    with pytest.raises(ValueError, match=r"\[PAD\].*id 0"):
        load_tokenizer(tmp_path / "wrong.json")
    with pytest.raises(ValueError, match="could not read tokenizer"):
        load_tokenizer(tmp_path / "missing.json")


# -- the assembled model -------------------------------------------------------------------------------------

def tiny_batch(cfg, batch_size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, cfg.in_chans, cfg.input_size, cfg.input_size, generator=generator)
    input_ids = torch.randint(4, 100, (batch_size, 12), generator=generator)
    input_ids[:, 0] = 2
    return images, input_ids, torch.ones_like(input_ids)


def test_tiny_forward_and_backward_give_finite_loss_and_gradients_everywhere():
    torch.manual_seed(0)
    cfg = MaCoConfig.preset("tiny")
    model = MaCo(cfg)
    out = model(*tiny_batch(cfg))
    assert torch.isfinite(out["loss"])
    assert out["pred"].shape == (4, cfg.num_patches, (2 * cfg.patch_size) ** 2 * cfg.in_chans)
    assert torch.allclose(out["loss"], cfg.lam * out["loss_rec"] + (1 - cfg.lam) * out["loss_con"])
    # at init the score head is zero, so every correlation weight is softplus(0) = ln 2
    assert torch.allclose(out["correlation_weights"], torch.full((4,), math.log(2)))
    out["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    assert model.correlation_head.weight.grad.abs().sum() > 0 and model.logit_scale.grad != 0


def test_temperature_is_clamped_at_100_in_the_forward():
    cfg = MaCoConfig.preset("tiny")
    model = MaCo(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(500.0)
    out = model(*tiny_batch(cfg))
    assert out["logit_scale"].item() == 100.0
    out["loss"].backward()
    assert model.logit_scale.grad.item() == 0.0  # clamped: no gradient pushes it further


def test_mask_ratio_zero_has_no_reconstruction_term():
    cfg = MaCoConfig.preset("tiny", mask_ratio=0.0)
    out = MaCo(cfg)(*tiny_batch(cfg))
    assert out["pred"] is None and out["mask"].sum() == 0
    assert out["loss"].item() == pytest.approx(out["loss_con"].item())


def test_weighting_off_gives_plain_clip_loss_on_the_same_embeddings():
    torch.manual_seed(0)
    cfg = MaCoConfig.preset("tiny", correlation_weighting=False, text_dropout=0.0)
    model = MaCo(cfg)
    images, input_ids, attention_mask = tiny_batch(cfg)
    out = model(images, input_ids, attention_mask, generator=torch.Generator().manual_seed(5))
    assert torch.all(out["correlation_weights"] == 1)
    # rebuild the image embedding from the same mask: the mean of the projected visible tokens
    h, _, _ = model.image_encoder(torch.nn.functional.interpolate(images, size=cfg.img_size, mode="bicubic"),
                                  cfg.mask_ratio, torch.Generator().manual_seed(5))
    image_emb = model.image_proj(h[:, 1:]).mean(dim=1)
    expected = clip_loss(image_emb, model.encode_text(input_ids, attention_mask), model.logit_scale)
    assert out["loss_con"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_caption_keys_are_equal_exactly_for_equal_token_sequences_whatever_the_padding():
    ids = torch.tensor([[2, 7, 9, 0, 0], [2, 7, 9, 0, 0], [2, 9, 7, 0, 0], [2, 7, 9, 11, 0]])
    keys = caption_keys(ids)
    assert keys[0] == keys[1] and len(set(keys[1:].tolist())) == 3
    assert torch.equal(caption_keys(ids[:, :4])[:3], keys[:3])  # padded to another length: the same key


def test_identical_captions_are_not_negatives_with_the_option_and_are_without_it():
    torch.manual_seed(0)
    cfg = MaCoConfig.preset("tiny", correlation_weighting=False, text_dropout=0.0, mask_identical_captions=True)
    model = MaCo(cfg)
    images, input_ids, attention_mask = tiny_batch(cfg)
    input_ids[2] = input_ids[0]  # pairs 0 and 2 share their caption
    out = model(images, input_ids, attention_mask, generator=torch.Generator().manual_seed(5))
    h, _, _ = model.image_encoder(torch.nn.functional.interpolate(images, size=cfg.img_size, mode="bicubic"),
                                  cfg.mask_ratio, torch.Generator().manual_seed(5))
    image_emb, text_emb = model.image_proj(h[:, 1:]).mean(dim=1), model.encode_text(input_ids, attention_mask)
    excluded = torch.zeros(4, 4, dtype=torch.bool)
    excluded[0, 2] = excluded[2, 0] = True
    assert out["loss_con"].item() == pytest.approx(clip_loss(image_emb, text_emb, model.logit_scale, excluded).item(),
                                                   abs=1e-5)
    assert out["loss_con"].item() != pytest.approx(clip_loss(image_emb, text_emb, model.logit_scale).item(), abs=1e-4)


def test_encode_image_returns_patch_embeddings_and_their_mean():
    cfg = MaCoConfig.preset("tiny")
    model = MaCo(cfg).eval()
    patch_emb, image_emb = model.encode_image(torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size))
    assert patch_emb.shape == (2, cfg.num_patches, cfg.embed_dim)
    assert torch.allclose(image_emb, patch_emb.mean(dim=1))


def test_wrong_image_size_gives_a_clear_error():
    cfg = MaCoConfig.preset("tiny")
    images, input_ids, attention_mask = tiny_batch(cfg)
    with pytest.raises(ValueError, match="expects 128x128"):
        MaCo(cfg)(images[..., :64, :64], input_ids, attention_mask)


def test_optimizer_exempts_biases_norms_tokens_and_temperature_from_weight_decay():
    model = MaCo(MaCoConfig.preset("tiny"))
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert "image_encoder.blocks.0.attn.qkv.weight" in names and "decoder_pred.weight" in names
    for exempt in ["logit_scale", "image_encoder.cls_token", "mask_token", "image_encoder.norm.weight",
                   "image_encoder.blocks.0.attn.qkv.bias", "text_encoder.embeddings.position_embeddings.weight"]:
        assert exempt not in names
    assert len(decayed) + len(optimizer.param_groups[1]["params"]) == len(list(model.parameters()))


def test_a_float64_model_runs_its_forward_and_backward_in_float64():
    torch.manual_seed(0)
    cfg = MaCoConfig.preset("tiny")
    model = MaCo(cfg).double()
    images, input_ids, attention_mask = tiny_batch(cfg)
    out = model(images.double(), input_ids, attention_mask)
    assert out["loss"].dtype == torch.float64 and out["loss_con"].dtype == torch.float64
    out["loss"].backward()
    assert model.correlation_head.weight.grad.dtype == torch.float64


def test_the_parameter_table_of_the_docs_is_the_models():
    """docs/paper-run.md, "Model sizes": image encoder, decoder, text encoder, heads, total, for each preset."""
    text = (Path(__file__).resolve().parents[1] / "docs/paper-run.md").read_text()
    count = lambda *modules: sum(p.numel() for m in modules for p in (m.parameters() if isinstance(m, nn.Module) else [m]))
    for preset in ("tiny", "base"):
        with torch.device("meta"):  # shapes only: no memory for base
            model = MaCo(MaCoConfig.preset(preset))
        row = re.search(rf"^\| `{preset}` \| (.+) \|$", text, re.MULTILINE).group(1)
        documented = [int(value.replace(",", "")) for value in row.split(" | ")]
        measured = [count(model.image_encoder),
                    count(model.decoder_embed, model.decoder_blocks, model.decoder_norm, model.decoder_pred,
                          model.mask_token),
                    count(model.text_encoder), count(model.image_proj, model.correlation_head, model.logit_scale),
                    count(model)]
        assert documented == measured, preset
