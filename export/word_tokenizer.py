"""Word-level `tokenizers` tokenizers for the project's own small models.

The tiny test checkpoints (and the demo model) have small closed vocabularies; a word-level
tokenizer keeps the embedding table tiny while still being a real `tokenizer.json` that the
Hugging Face tokenizer and the torch-free runtime load the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

BOS, EOS, UNK, PAD, IMAGE = "<s>", "</s>", "<unk>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)  # ids 0..4, in this order


def build_word_tokenizer(words: Iterable[str]) -> Tokenizer:
    """Specials get ids 0..4, then `words` in the given order (duplicates dropped)."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return tokenizer
