"""A source's noun-phrase vocabulary: batches carry phrase ids and token ids, never strings."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from sam3_jax.data.errors import DataError


def tokenize(phrases: list[str], context_length: int) -> np.ndarray:
    """CLIP BPE token ids, int32 [len(phrases), context_length], zero-padded."""
    from sam3_jax.model.tokenizer import SimpleTokenizer  # lazy: the data package needs no model

    if not phrases:
        return np.zeros((0, context_length), np.int32)
    return np.asarray(SimpleTokenizer()(phrases, context_length=context_length), np.int32)


class PhraseVocabulary:
    """Sorted unique phrases of one source, tokenised once (before workers are forked).

    Phrases that are not valid Unicode (undecodable bytes read with `surrogateescape`, lone
    surrogates in JSON escapes) stay in the vocabulary so ids are stable, but get no tokens;
    `check` turns their use into a `DataError` naming `path`.
    """

    def __init__(self, phrases: Iterable[str], path: str = "<config>"):
        self.phrases = tuple(sorted(set(phrases)))
        self.path = path
        self._ids = {p: i for i, p in enumerate(self.phrases)}
        self._bad = {i for i, p in enumerate(self.phrases) if not _is_unicode(p)}
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.phrases)

    def id(self, phrase: str) -> int:
        return self._ids[phrase]

    def check(self, ids: Iterable[int]) -> None:
        for i in ids:
            if i in self._bad:
                raise DataError(self.path, "phrase", f"not valid UTF-8: {self.phrases[i]!r}")

    def tokens(self, context_length: int) -> np.ndarray:
        """int32 [len(self), context_length]; rows of unusable phrases are zero."""
        if self._tokens is None or self._tokens.shape[1] != context_length:
            good = [i for i in range(len(self)) if i not in self._bad]
            table = np.zeros((len(self), context_length), np.int32)
            table[good] = tokenize([self.phrases[i] for i in good], context_length)
            self._tokens = table
        return self._tokens


def _is_unicode(phrase: str) -> bool:
    try:
        phrase.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
