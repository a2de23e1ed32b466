"""The CLIP BPE tokenizer on its own (no torch): ids, padding, truncation, decoding, errors."""
import gzip
import pickle

import numpy as np
import pytest

from sam3_jax.model.tokenizer import SimpleTokenizer

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return SimpleTokenizer()


def test_known_ids(tok):
    # Ids from the reference (sam3 0.1.4 SimpleTokenizer); the parity test checks many more strings.
    assert tok.vocab_size == 49408 and (tok.sot_token_id, tok.eot_token_id) == (SOT, EOT)
    assert tok.encode("a cat") == [320, 2368]
    assert tok.encode("  A   CAT ") == [320, 2368]
    assert tok.encode("!!") == [748]
    assert tok.encode("dog!~") == [1929, 0, 349]  # id 0 (bare "!") inside a caption


def test_layout_padding_and_truncation(tok):
    ids = tok(["a cat", "", "a " * 40])
    assert ids.dtype == np.int32 and ids.shape == (3, 32)
    np.testing.assert_array_equal(ids[0, :5], [SOT, 320, 2368, EOT, 0])
    np.testing.assert_array_equal(ids[1, :3], [SOT, EOT, 0])
    assert (ids[2, 1:31] == 320).all() and ids[2, 31] == EOT  # cut to 32, last set to eot
    assert tok("a cat").shape == (1, 32)
    assert tok(["a cat"], context_length=4).tolist() == [[SOT, 320, 2368, EOT]]
    assert tok(["a cat"], context_length=3).tolist() == [[SOT, 320, EOT]]


def test_cleaning(tok):
    assert tok.encode("&amp;amp;") == tok.encode("&")  # unescaped twice
    assert tok.encode("\tHello\n\nWorld ") == tok.encode("hello world")


def test_decode_round_trip(tok):
    for text in ["a cat on the mat", "café 猫 😀"]:
        assert tok.decode(tok.encode(text)).strip() == text
    assert tok.decode(tok.encode("3.14")) == "3 . 1 4 "  # every word, digit and symbol run ends with a space
    assert tok.decode(tok("a dog")[0, :4]) == "<start_of_text>a dog <end_of_text>"


def test_vocabulary_shared_and_picklable(tok):
    assert SimpleTokenizer().vocab is tok.vocab  # loaded once per file
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone(["a red car"]), tok(["a red car"]))


def test_bad_vocabulary_files(tmp_path):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        SimpleTokenizer(missing)
    garbage = tmp_path / "garbage.txt.gz"
    garbage.write_bytes(b"not gzip")
    with pytest.raises(OSError, match=str(garbage)):
        SimpleTokenizer(garbage)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as f:
        f.write("#version\ni n\n")
    with pytest.raises(ValueError, match=str(short)):
        SimpleTokenizer(short)
