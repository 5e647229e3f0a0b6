"""The report side of MaCo: a BERT-style text encoder written directly in PyTorch (docs/method.md §4, D1).

A post-LayerNorm BERT trained from scratch (384 wide, 6 layers, 6 heads in `base`); the report embedding is a
pooler tanh(Linear(384 -> 768)) on token 0, the [CLS] position. There is no masked-language-model head: MaCo
never predicts words (tools/warm_start.py's optional warm start of the text side adds one for its own phase). The tokenizer that makes `input_ids` is in util/tokenizer.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.tokenizer import PAD_ID


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, width, max_len, type_vocab_size, dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(max_len, width)
        # kept although every input has type 0: the released checkpoint has this table (and BERT's layout)
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
        self.pooler = nn.Linear(width, embed_dim)  # 384 -> 768 in the released checkpoint (docs/method.md §4)
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

    def hidden_states(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, T) -> the last layer's token states (B, T, W) (tools/warm_start.py's masked
        report modelling predicts words from them)."""
        if input_ids.shape[1] > self.embeddings.position_embeddings.num_embeddings:
            raise ValueError(f"text of {input_ids.shape[1]} tokens is longer than the encoder's "
                             f"{self.embeddings.position_embeddings.num_embeddings} positions; tokenize with max_len")
        key_padding_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids)  # (B, T, W)
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return x

    def forward(self, input_ids, attention_mask):
        x = self.hidden_states(input_ids, attention_mask)  # (B, T, W)
        return torch.tanh(self.pooler(x[:, 0]))  # (B, embed_dim), pooled on [CLS]
