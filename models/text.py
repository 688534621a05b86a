"""Tokenizers stored with text models (as `tokenizer.json` in the version folder), so requests send raw text.

- `WordIndexTokenizer`: a small built-in word index (Keras `Tokenizer` style): lower-cased words, id 0 is
  padding, id 1 the out-of-vocabulary token, then words by frequency. Its JSON is our own little format.
- `WordPieceTokenizer`: a Hugging Face `tokenizers` file (e.g. BERT's WordPiece), padded to the longest
  sentence of the batch and truncated at `max_length`.

Both turn a list of strings into `ids` int64 `[B, S]` and `mask` bool `[B, S]` (True for real tokens): numpy
arrays from the word index (its numpy twin serves them as they are), torch tensors from WordPiece.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from models.artifact import TOKENIZER_FILE, ArtifactError, TensorSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: a worker serving numpy twins never imports it
    import torch

_WORD_RE = re.compile(r"[\w']+")
PAD_ID, OOV_ID = 0, 1
# `encode` tokenizes a whole batch in one pass over its texts joined by this marker, which comes out as a word
# of its own. NUL is no word character, so inside a text it only separates words, as a space does: a text
# holding one gets a space instead.
_TEXT_END = "\x00"
_BATCH_WORD_RE = re.compile(r"[\w']+|\x00")
# For ASCII text (lower-cased or not, as the tokenizer says) `bytes.translate` + `split` find the same words
# as `_WORD_RE` several times faster: on ASCII, \w is [A-Za-z0-9_]; everything else but ' and NUL is a space.
_ASCII_NON_WORD_TO_SPACE = bytes(c if chr(c).isalnum() or chr(c) in "_'" + _TEXT_END else ord(" ") for c in range(128))
_ASCII_NON_WORD_TO_SPACE += bytes(range(128, 256))  # never met: the text is ASCII
BATCH_PASS_MIN_TEXTS = 8  # fewer are tokenized text by text (equally fast at 8 on a 2-core VM)
# A longer text is read only as far as the words a model takes from it: tokenized whole, a text costs some 25
# times its size (a batch of eight 4 MiB texts of short words took 727 MB and 1 s, for 10 ids a row), and a batch
# of a model's max_batch_size of them could end the worker for want of memory.
LONG_TEXT_CHARS = 4096


class WordIndexTokenizer:
    """Word -> id; unknown words -> `OOV_ID`; sequences truncated or padded (with `PAD_ID`) to a length."""

    def __init__(self, words: list[str], lowercase: bool = True, oov_token: str = "<OOV>",
                 pad_token: str = "<PAD>") -> None:
        self.words = list(words)
        self.lowercase = lowercase
        self.oov_token, self.pad_token = oov_token, pad_token
        self.index = {w: i + 2 for i, w in enumerate(self.words)}
        # For `encode`: the marker between texts maps to -1. No real word is the marker (the regex never
        # finds it in a text), so no vocabulary entry is lost; ASCII words also as bytes, for the fast path.
        self._batch_index = {**self.index, _TEXT_END: -1}
        self._ascii_index = {w.encode(): i for w, i in self._batch_index.items() if w.isascii()}

    @property
    def size(self) -> int:
        """Number of ids, padding and OOV included."""
        return len(self.words) + 2

    @classmethod
    def fit(cls, texts: Iterable[str], num_words: int) -> WordIndexTokenizer:
        """The `num_words - 2` most frequent words of `texts` (ties broken by first appearance)."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(_WORD_RE.findall(text.lower()))
        return cls([w for w, _ in counts.most_common(max(0, num_words - 2))])

    @classmethod
    def from_json(cls, raw: bytes | str) -> WordIndexTokenizer:
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{TOKENIZER_FILE}: invalid JSON ({exc})") from None
        if not isinstance(body, dict) or body.get("type") != "word_index":
            raise ArtifactError(f"{TOKENIZER_FILE}.type: expected 'word_index'")
        words = body.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise ArtifactError(f"{TOKENIZER_FILE}.words: expected a list of non-empty strings")
        if len(set(words)) != len(words):
            raise ArtifactError(f"{TOKENIZER_FILE}.words: duplicate words")
        lowercase = body.get("lowercase", True)
        if not isinstance(lowercase, bool):
            raise ArtifactError(f"{TOKENIZER_FILE}.lowercase: expected true or false, got {lowercase!r:.40}")
        return cls(words, lowercase, str(body.get("oov_token", "<OOV>")),
                   str(body.get("pad_token", "<PAD>")))

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"type": "word_index", "lowercase": self.lowercase, "pad_token": self.pad_token,
                                "oov_token": self.oov_token, "pad_id": PAD_ID, "oov_id": OOV_ID,
                                "words": self.words}
        return (json.dumps(body) + "\n").encode()

    def tokens(self, text: str, limit: int | None = None) -> list[int]:
        """The ids of the words of ``text``, or of its first ``limit`` words: a long text is read no further."""
        text = text.lower() if self.lowercase else text
        if limit is None or len(text) <= LONG_TEXT_CHARS:
            words = _WORD_RE.findall(text)[:limit]
        else:
            words = [match.group() for match in itertools.islice(_WORD_RE.finditer(text), limit)]
        return [self.index.get(w, OOV_ID) for w in words]

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """``tokens`` of every text, truncated or padded to ``length``. From 8 texts on, one pass finds the
        words of the whole batch, one looks them up and numpy lays them out, instead of a Python loop per
        text: at batch 4,096 tokenizing was nearly all of a text classifier's serving time (about 13 of 14 ms
        on an H100 machine), and this pass is about 3x faster."""
        ids = np.zeros((len(texts), length), dtype=np.int64)
        if len(texts) < BATCH_PASS_MIN_TEXTS or length == 0:  # the batch pass's fixed cost is some 15 us
            for row, text in enumerate(texts):
                tokens = self.tokens(text, length)
                ids[row, : len(tokens)] = tokens
            return ids, ids != PAD_ID
        # Long texts are tokenized on their own, as far as their first `length` words (see LONG_TEXT_CHARS).
        long_texts = {row: text for row, text in enumerate(texts) if len(text) > LONG_TEXT_CHARS}
        if long_texts:
            texts = ["" if row in long_texts else text for row, text in enumerate(texts)]
        marker = f" {_TEXT_END} "
        joined = marker.join(texts)
        if joined.count(_TEXT_END) != len(texts) - 1:
            joined = marker.join(t.replace(_TEXT_END, " ") for t in texts)
        if self.lowercase:  # the same as lower-casing text by text: no character's case depends on the marker
            joined = joined.lower()
        if joined.isascii():
            words, index = joined.encode().translate(_ASCII_NON_WORD_TO_SPACE).split(), self._ascii_index
        else:
            words, index = _BATCH_WORD_RE.findall(joined), self._batch_index
        flat = np.fromiter(map(index.get, words, itertools.repeat(OOV_ID)), np.int64, len(words))
        ends = np.flatnonzero(flat < 0)  # one after each text's last token, but the last text's
        starts = np.concatenate(([0], ends + 1))
        counts = np.minimum(np.append(ends, len(flat)) - starts, length)
        rows = np.repeat(np.arange(len(texts)), counts)
        cols = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        ids[rows, cols] = flat[np.repeat(starts, counts) + cols]
        for row, text in long_texts.items():
            tokens = self.tokens(text, length)
            ids[row, : len(tokens)] = tokens
        return ids, ids != PAD_ID


PAD_MULTIPLE = 16


class WordPieceTokenizer:
    """A Hugging Face `tokenizers` JSON file; pads to the batch's longest sentence, rounded up to a multiple
    of 16 so that batches fall into a few shape buckets (fewer kernel specialisations, reusable graphs)."""

    def __init__(self, raw: bytes | str, max_length: int) -> None:
        from tokenizers import Tokenizer  # imported here: only transformer models need it

        try:
            self.tokenizer = Tokenizer.from_str(raw.decode() if isinstance(raw, bytes) else raw)
        except Exception as exc:  # the Rust side raises plain Exceptions for malformed files
            raise ArtifactError(f"{TOKENIZER_FILE}: not a valid Hugging Face tokenizer file ({exc})") from None
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.no_padding()
        self.tokenizer.enable_padding(pad_id=pad_id or 0, pad_token="[PAD]" if pad_id is not None else "<pad>",
                                      pad_to_multiple_of=PAD_MULTIPLE)
        self.tokenizer.enable_truncation(max_length=max_length)
        self.max_length = max_length

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if not texts:
            return torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.bool)
        texts = [self._head(text) if len(text) > LONG_TEXT_CHARS else text for text in texts]
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which nothing here reads: 512
        # short texts took 8.6 instead of 10.6 ms on a 2-core VM. Lists of ints go to tensors through numpy,
        # twice as fast as torch.tensor on them.
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode_batch(texts)
        ids = torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int64))
        mask = torch.from_numpy(np.array([e.attention_mask for e in encodings], dtype=np.bool_))
        # Rounding up to the multiple of 16 may pass a max_length that is not one, and with it the model's
        # position table: the columns past max_length are padding only (truncation saw to that).
        return ids[:, :self.max_length], mask[:, :self.max_length]

    def _head(self, text: str) -> str:
        """The first of ``text``'s heads of 4,096, 16,384, ... characters whose ``max_length`` tokens all come
        from words it holds whole, which the whole text splits alike; else ``text``. Encoded whole, a 4 MiB text
        took 0.6 GB and 2 s for its 256 tokens, and a batch of such texts could end the worker for want of memory."""
        end = LONG_TEXT_CHARS
        while end < len(text):
            encoding = self.tokenizer.encode(text[:end])  # truncated: the rest of the head overflows
            kept = max((w for w in encoding.word_ids if w is not None), default=-1)
            last = max((w for part in encoding.overflowing for w in part.word_ids if w is not None), default=-1)
            if last > kept:  # a word after the last one kept: that one ends inside the head
                return text[:end]
            end *= 4
        return text


def check_vocabulary(tokenizer: WordIndexTokenizer, vocab_size: int, where: str) -> None:
    """A word index must fit the embedding table it indexes."""
    if tokenizer.size > vocab_size:
        raise ArtifactError(f"{TOKENIZER_FILE}: {tokenizer.size} ids (words + padding + OOV) exceed "
                            f"{where}.params.vocab_size {vocab_size}")


class InvalidTextError(ValueError):
    """A text element that is not UTF-8: the caller's to fix, not the model's failure. `name` is the input, so
    that the engine can find the request that sent it and run its batch-mates."""

    def __init__(self, name: str, row: int, exc: UnicodeDecodeError) -> None:
        super().__init__(f"input {name!r}: element {row} is not UTF-8 text ({exc.reason} at byte {exc.start})")
        self.name = name


def texts_of(array: Any, name: str = "text") -> list[str]:
    """A V2 BYTES input ([B] or [B, 1] object array of bytes, or a list of str) as a list of B strings.

    Bytes that are not UTF-8 raise `InvalidTextError` rather than decode with replacement characters: a
    tokenizer would read those as words, and the caller would get an answer about text it never sent."""
    if isinstance(array, np.ndarray):
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise ValueError(f"text input must have shape [B] or [B, 1], got {list(array.shape)}")
        items = array.tolist()
    else:
        items = list(array)
    try:
        return [x.decode("utf-8") if isinstance(x, bytes | bytearray) else str(x) for x in items]
    except UnicodeDecodeError:  # which element: searched for only once one failed
        for row, item in enumerate(items):
            try:
                if isinstance(item, bytes | bytearray):
                    item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidTextError(name, row, exc) from None
        raise


def sample_sentences(words: list[str], specs: tuple[TensorSpec, ...], batch: int, seed: int,
                     length: int = 8) -> dict[str, np.ndarray]:
    """`batch` sentences of vocabulary words (plus one unknown word each) for the "text" input (BYTES)."""
    rng = np.random.default_rng(seed)
    pool = words[:200] or ["hello"]
    texts = [" ".join([*rng.choice(pool, size=max(1, length - 1)).tolist(), "zzunknownzz"]) for _ in range(batch)]
    spec = next((s for s in specs if s.name == "text"), None)
    shape = (batch, 1) if spec is not None and len(spec.shape) == 2 else (batch,)
    return {"text": np.array([t.encode() for t in texts], dtype=object).reshape(shape)}
