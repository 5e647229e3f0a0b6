"""The report side of MaCo: a WordPiece tokenizer and a BERT-style text encoder, written directly in PyTorch.

Spec: maco-method.md section 4 (decisions D1, D6, D7). The encoder is a post-LayerNorm BERT trained from
scratch (384 wide, 6 layers, 6 heads in `base`); the report embedding is a pooler tanh(Linear(384 -> 768)) on
token 0, the [CLS] position. There is no masked-language-model head: MaCo never predicts words.
"""

from collections import Counter
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[MASK]"]  # ids 0, 1, 2, 3, as in the released mimic_wordpiece.json
PAD_ID, CLS_ID = 0, 2


# ----------------------------------------------------------------------------------------------------------
# Tokenizer (D7)

def train_tokenizer(texts: Iterable[str], vocab_size: int = 30000) -> Tokenizer:
    """Build a WordPiece tokenizer with the released tokenizer's settings from an iterable of report texts.

    Lower-case, NFKD, strip accents; split into word runs / punctuation runs, then digit groups. The vocabulary
    is the special tokens, every character seen (alone and as a "##" continuation) and then the most frequent
    words, ties broken alphabetically: the library's own trainer breaks ties between equally frequent merges in
    hash order, so two runs on the same reports would get different vocabularies. Rarer words are split into
    pieces by WordPiece's greedy longest match. The post-processor prepends [CLS] (no [SEP] exists), so callers
    pass plain captions.
    """
    tokenizer = Tokenizer(models.WordPiece({}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=False)])
    counts = Counter()
    for text in texts:
        normalized = tokenizer.normalizer.normalize_str(text)
        counts.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized))
    alphabet = sorted({char for word in counts for char in word})
    vocab = SPECIAL_TOKENS + alphabet + ["##" + char for char in alphabet]
    words = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    vocab += words[:max(vocab_size - len(vocab), 0)]
    tokenizer.model = models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]",
                                       continuing_subword_prefix="##")
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", CLS_ID)])
    return tokenizer


def check_special_tokens(tokenizer: Tokenizer, source: str = "tokenizer") -> None:
    """Raise a clear error if the tokenizer's special ids differ from [PAD]=0 [UNK]=1 [CLS]=2 [MASK]=3."""
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise ValueError(f"{source}: expected {token} to have id {expected_id}, "
                             f"found {tokenizer.token_to_id(token)}; MaCo needs the released special ids")


def save_tokenizer(tokenizer: Tokenizer, path) -> None:
    tokenizer.save(str(path))


def load_tokenizer(path) -> Tokenizer:
    """Load a `tokenizers` JSON file (ours, or the released `mimic_wordpiece.json`) unchanged."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises a bare Exception for missing or malformed files
        raise ValueError(f"could not read tokenizer file {path}: {error}") from None
    check_special_tokens(tokenizer, str(path))
    return tokenizer


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_len: int = 100) -> dict:
    """Tokenize captions into a padded batch: [CLS] + tokens, truncated to max_len, padded to the longest.

    Returns input_ids (B, T) and attention_mask (B, T), 1 = real token, 0 = padding (id 0), T <= max_len.
    The released tokenizer file has no post-processor; it was fed "[CLS] " + caption, which we do for it.
    """
    if tokenizer.post_processor is None:
        texts = ["[CLS] " + text for text in texts]
    ids = [encoding.ids[:max_len] for encoding in tokenizer.encode_batch(texts)]
    longest = max(len(seq) for seq in ids)
    input_ids = torch.full((len(ids), longest), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------------------------------------
# Encoder (D1)

class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, width, max_len, type_vocab_size, dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(max_len, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        # every input has token type 0 (single-segment text)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))  # (B, T, W)


class BertSelfAttention(nn.Module):
    def __init__(self, width, num_heads, dropout):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x, key_padding_mask):
        B, T, W = x.shape
        H = self.num_heads
        q, k, v = (proj(x).view(B, T, H, W // H).transpose(1, 2) for proj in (self.query, self.key, self.value))  # (B, H, T, Dh)
        # key_padding_mask (B, 1, 1, T), True = attend: padded keys get no weight, so padding cannot change outputs
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, T, W)  # (B, T, W)


class BertLayer(nn.Module):
    """Post-LayerNorm: a = LN(x + Drop(Attn(x))); y = LN(a + Drop(FFN(a)))."""

    def __init__(self, width, num_heads, ffn_width, dropout):
        super().__init__()
        self.attention = BertSelfAttention(width, num_heads, dropout)
        self.attention_output = nn.Linear(width, width)
        self.attention_norm = nn.LayerNorm(width, eps=1e-12)
        self.intermediate = nn.Linear(width, ffn_width)
        self.output = nn.Linear(ffn_width, width)
        self.output_norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, key_padding_mask):
        x = self.attention_norm(x + self.dropout(self.attention_output(self.attention(x, key_padding_mask))))
        return self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class TextEncoder(nn.Module):
    """BERT-style encoder + pooler. forward(input_ids (B, T), attention_mask (B, T)) -> (B, embed_dim) in (-1, 1)."""

    def __init__(self, vocab_size=30000, width=384, depth=6, num_heads=6, ffn_width=1536, max_len=100,
                 type_vocab_size=2, dropout=0.1, embed_dim=768):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, width, max_len, type_vocab_size, dropout)
        self.layers = nn.ModuleList([BertLayer(width, num_heads, ffn_width, dropout) for _ in range(depth)])
        self.pooler = nn.Linear(width, embed_dim)  # 384 -> 768 in the released checkpoint (spec section 4)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # as released: embeddings N(0, 0.02) with the [PAD] row zero, Linear Xavier-uniform, LayerNorm (1, 0)
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, attention_mask):
        if input_ids.shape[1] > self.embeddings.position_embeddings.num_embeddings:
            raise ValueError(f"text of {input_ids.shape[1]} tokens is longer than the encoder's "
                             f"{self.embeddings.position_embeddings.num_embeddings} positions; tokenize with max_len")
        key_padding_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids)  # (B, T, W)
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return torch.tanh(self.pooler(x[:, 0]))  # (B, embed_dim), pooled on [CLS]
