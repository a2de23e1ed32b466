"""CLIP byte-level BPE tokenizer producing exactly the reference's token ids (docs/reference_model.md, 'Tokenizer').

Text is cleaned (ftfy, HTML entities, whitespace, lower case), split into words by the CLIP
pattern, each word's UTF-8 bytes are spelled with printable stand-in characters and merged by the
ranked BPE merges; a caption becomes ``[sot] + tokens + [eot]``, zero-padded to the context length.
The vocabulary is read once per file and shared by every ``SimpleTokenizer`` on it, so building a
tokenizer per call (as the data pipeline does) costs nothing after the first.
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses (the file holds more)
SOT, EOT = "<start_of_text>", "<end_of_text>"
END_OF_WORD = "</w>"
WORD_CACHE_SIZE = 1 << 16


@functools.cache
def byte_to_char() -> dict[int, str]:
    """A reversible byte -> character map that avoids whitespace and control characters.

    Printable Latin-1 bytes stand for themselves; the 68 others get the characters from U+0100 on,
    in byte order, so every byte of any UTF-8 string is one visible vocabulary symbol.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


@functools.cache
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def clean(text: str) -> str:
    """The reference's ``clean="lower"``: fix mojibake, unescape HTML twice, collapse whitespace, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class Vocabulary:
    """Token table and ranked merges of one BPE file, with a bounded cache of encoded words."""

    def __init__(self, path: str):
        merges = read_merges(path)
        symbols = sorted(byte_to_char().values())  # = byte-table order: printable first, then U+0100..
        tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.path = path
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        self.id_to_token = tokens
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.word_pattern = regex.compile(
            "|".join(map(regex.escape, (SOT, EOT)))
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.word_pieces = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._word_pieces)

    def _word_pieces(self, word: str) -> tuple[str, ...]:
        """Applies the merges to one byte-spelled word, lowest rank first, all occurrences left to right."""
        if word in (SOT, EOT):
            return (word,)
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, NUM_MERGES))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)


def read_merges(path: str) -> list[tuple[str, str]]:
    """The first ``NUM_MERGES`` merge rules of a gzipped CLIP BPE file (line 0 is a version header)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP BPE vocabulary file not found: {path}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise OSError(f"cannot read the CLIP BPE vocabulary file {path}: {e}") from e
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) < NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE vocabulary: expected {NUM_MERGES} merge lines of two symbols")
    return merges


@functools.lru_cache(maxsize=8)
def load_vocabulary(path: str) -> Vocabulary:
    return Vocabulary(path)


class SimpleTokenizer:
    """``SimpleTokenizer()(texts) -> int32 [N, context_length]``, the reference's ids and padding."""

    def __init__(self, bpe_path: str | os.PathLike | None = None):
        self.bpe_path = os.fspath(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        self.vocab = load_vocabulary(self.bpe_path)
        self.vocab_size = len(self.vocab.id_to_token)
        self.sot_token_id = self.vocab.token_to_id[SOT]
        self.eot_token_id = self.vocab.token_to_id[EOT]

    def __reduce__(self):  # pickles as its path: the shared vocabulary is reloaded, not copied
        return SimpleTokenizer, (self.bpe_path,)

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, without start/end tokens."""
        chars = byte_to_char()
        ids = []
        for word in self.vocab.word_pattern.findall(clean(text)):
            spelled = "".join(chars[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab.token_to_id[p] for p in self.vocab.word_pieces(spelled))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (pass them without padding: id 0 is the symbol "!"); word ends become spaces."""
        text = "".join(self.vocab.id_to_token[int(i)] for i in ids)
        byte_of = char_to_byte()
        return bytes(byte_of[c] for c in text).decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts: str | Sequence[str], context_length: int = 32) -> np.ndarray:
        """``[sot] + tokens + [eot]`` per caption, zero-padded; too long -> cut to fit, last id = eot."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in zip(out, texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            row[:len(ids)] = ids
        return out
