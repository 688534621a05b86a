"""The word-index tokenizer's batch `encode` (one pass over the joined batch, an ASCII fast path) must give
exactly what tokenizing each text on its own gives; so must the WordPiece tokenizer's batch encode."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest
import torch

from models.text import BATCH_PASS_MIN_TEXTS, OOV_ID, PAD_ID, WordIndexTokenizer

WORDS = ["the", "cat", "sat", "don't", "snake_case", "42", "café", "straße", "οδος", "ὀδός", "k"]
# ASCII words and separators, NUL, accents, a final sigma, the Kelvin sign (lower-cases to ASCII 'k'), a
# dotted capital I (lower-cases to two characters), digits of other scripts, emoji.
ALPHABET = [*"abcTHE xyz_'0123456789.,;!?-\t\n\x00", "CAFÉ", "Straße", "ΟΔΟΣ", "\u212a", "İ", "٣", "🙂"]


def one_by_one(tokenizer: WordIndexTokenizer, texts: list[str], length: int) -> np.ndarray:
    ids = np.full((len(texts), length), PAD_ID, dtype=np.int64)
    for row, text in enumerate(texts):
        tokens = tokenizer.tokens(text)[:length]
        ids[row, : len(tokens)] = tokens
    return ids


def random_text(rng: random.Random) -> str:
    parts = [rng.choice(WORDS + [w.upper() for w in WORDS]) if rng.random() < 0.5 else rng.choice(ALPHABET)
             for _ in range(rng.randrange(0, 14))]
    return "".join(p + (" " if rng.random() < 0.6 else "") for p in parts)


@pytest.mark.parametrize("lowercase", [True, False])
@pytest.mark.parametrize("ascii_only", [True, False])
def test_encode_matches_text_by_text(lowercase: bool, ascii_only: bool) -> None:
    tokenizer = WordIndexTokenizer(WORDS, lowercase=lowercase)
    rng = random.Random(7)
    for length, batch in ((1, 200), (3, 200), (10, 200), (10, BATCH_PASS_MIN_TEXTS), (10, BATCH_PASS_MIN_TEXTS - 1)):
        texts = [random_text(rng) for _ in range(batch)]
        if ascii_only:
            texts = [t.encode("ascii", "ignore").decode() for t in texts]
        ids, mask = tokenizer.encode(texts, length)
        np.testing.assert_array_equal(ids, one_by_one(tokenizer, texts, length))
        np.testing.assert_array_equal(mask, ids != PAD_ID)


def test_encode_edges() -> None:
    tokenizer = WordIndexTokenizer(WORDS)
    ids, mask = tokenizer.encode([], 4)
    assert ids.shape == (0, 4) and mask.shape == (0, 4)
    texts = ["", "the\x00cat", "!!!", "The CAT sat, DON'T", "don't-stop", "\x00", *[""] * BATCH_PASS_MIN_TEXTS]
    ids, _ = tokenizer.encode(texts, 3)
    the, cat, sat, dont = (tokenizer.index[w] for w in ("the", "cat", "sat", "don't"))
    # NUL inside a text separates words like a space; a text of no words is all padding; long ones are cut.
    want = [[0, 0, 0], [the, cat, 0], [0, 0, 0], [the, cat, sat], [dont, OOV_ID, 0], [0, 0, 0]]
    np.testing.assert_array_equal(ids[:6], want)
    assert not ids[6:].any()
    ids, _ = tokenizer.encode(["unknown words CAFÉ straße"], 5)
    np.testing.assert_array_equal(ids, [[OOV_ID, OOV_ID, tokenizer.index["café"], tokenizer.index["straße"], 0]])


@pytest.mark.parametrize("batch", [1, BATCH_PASS_MIN_TEXTS])
def test_a_long_text_is_read_only_as_far_as_the_words_a_row_takes(batch: int) -> None:
    """A request may hold megabytes of text, of which a row takes its first `length` words. Tokenized whole, a
    2 MiB text of short words held some 50 MiB of word objects at once, and a batch of them ended the worker."""
    tokenizer = WordIndexTokenizer(WORDS)
    long = "The CAT sat " + "don't " * (2 * 1024 * 1024 // 6)
    texts = [long, "the cat", "x " + long[:5000], "sat " + long, *[""] * BATCH_PASS_MIN_TEXTS][:batch]
    want = one_by_one(tokenizer, texts, 5)
    tracemalloc.start()
    try:
        ids, mask = tokenizer.encode(texts, 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(mask, ids != PAD_ID)
    assert peak < 2 * len(long), f"{peak / 2**20:.1f} MiB to tokenize texts of {len(long) / 2**20:.1f} MiB"
    # Lower-cased text may have more words than the original (İ is i and a combining dot): the same ids.
    texts = ["İX ΟΔΟΣ. " * 300_000, *texts[1:]]
    np.testing.assert_array_equal(tokenizer.encode(texts, 5)[0], one_by_one(tokenizer, texts, 5))


def test_wordpiece_batch_matches_text_by_text() -> None:
    from models.artifact import TOKENIZER_FILE
    from models.examples import minilm_folder
    from models.text import PAD_MULTIPLE, WordPieceTokenizer

    tokenizer = WordPieceTokenizer((minilm_folder() / TOKENIZER_FILE).read_bytes(), max_length=40)
    texts = ["", "Hello, world!", "Ünïcödé façade naïve café", "word " * 60, "two\nlines\tand\x00nul"]
    ids, mask = tokenizer.encode(texts)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids.shape == mask.shape and ids.shape[1] == 40  # rounded up to 48, then cut back to max_length
    short, _ = tokenizer.encode(texts[:3])
    assert short.shape[1] % PAD_MULTIPLE == 0 and short.shape[1] < 40  # shorter batches: a multiple of 16
    single = tokenizer.tokenizer  # padding per text differs; compare the real tokens only
    for row, text in enumerate(texts):
        want = single.encode(text).ids
        want = want[: int(sum(single.encode(text).attention_mask))]
        assert ids[row, : len(want)].tolist() == want and int(mask[row].sum()) == len(want), text
        assert not mask[row, len(want):].any()


class _Recording:
    """A Hugging Face tokenizer that notes the length of every text it is handed."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def encode(self, text: str):
        self.lengths.append(len(text))
        return self.tokenizer.encode(text)

    def encode_batch_fast(self, texts: list[str]):
        self.lengths += map(len, texts)
        return self.tokenizer.encode_batch_fast(texts)

    encode_batch = encode_batch_fast


def test_wordpiece_reads_a_long_text_only_as_far_as_its_tokens_need() -> None:
    """Encoded whole, a 4 MiB text took 0.6 GB for the 256 tokens a row keeps: a long text is encoded from a head
    whose kept tokens come from whole words, which must give the tokens the whole text gives."""
    from models.artifact import TOKENIZER_FILE
    from models.examples import minilm_folder
    from models.text import WordPieceTokenizer

    tokenizer = WordPieceTokenizer((minilm_folder() / TOKENIZER_FILE).read_bytes(), max_length=40)
    texts = ["Unbelievable words, " * 20_000, "日本語のテキスト" * 40_000, "!" * 300_000, "x" * 300_000,
             "a" + " " * 10_000 + " more words" * 10_000,
             "short text"]
    whole = tokenizer.tokenizer
    want = [whole.encode(text) for text in texts]
    tokenizer.tokenizer = _Recording(whole)
    ids, mask = tokenizer.encode(texts)
    for row, encoding in enumerate(want):
        real = int(sum(encoding.attention_mask))
        assert ids[row, :real].tolist() == encoding.ids[:real] and int(mask[row].sum()) == real, row
    # Texts of many tokens are read as far as a head of 4,096 characters, the one whose words lie past a run of
    # 10,000 spaces as far as the next head, 16,384; the one word of 300,000 characters is read whole.
    assert sorted(tokenizer.tokenizer.lengths[-len(texts):]) == [10, 4096, 4096, 4096, 16_384, 300_000]
