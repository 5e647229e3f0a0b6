"""The WordPiece tokenizer of MaCo's reports, built with Hugging Face `tokenizers` (docs/method.md §4, D7).

Settings as the released `mimic_wordpiece.json` (from MRM): lower-case, NFKD, strip accents; word runs and
punctuation runs, then digit groups; special ids [PAD]=0 [UNK]=1 [CLS]=2 [MASK]=3 and no [SEP]. That file loads
unchanged; without one, `train_tokenizer` builds a vocabulary from the training reports.
"""

from collections import Counter
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[MASK]"]  # ids 0, 1, 2, 3, as in the released mimic_wordpiece.json
PAD_ID, CLS_ID = 0, 2


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


def as_tokenizer(tokenizer) -> Tokenizer:
    """A tokenizers.Tokenizer, or the path of a tokenizers JSON file (the released mimic_wordpiece.json)."""
    if isinstance(tokenizer, Tokenizer):
        check_special_tokens(tokenizer)
        return tokenizer
    return load_tokenizer(tokenizer)


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
