import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import EdgesmithError
from models.tokenizer import BOS, EOT, MIN_VOCAB, PAD, Tokenizer, train_tokenizer


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_arbitrary_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([BOS, EOT, PAD, "x", " ", "é", "\n"]), max_size=30).map("".join))
def test_round_trip_with_special_token_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_specials_and_vocab(tokenizer):
    assert tokenizer.vocab_size == 320
    assert {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} == {0, 1, 2}
    assert tokenizer.encode("def add") != [], "BPE learned merges"
    assert len(tokenizer.encode("def add(a, b):")) < len("def add(a, b):".encode())


def test_vocab_too_small_for_specials():
    with pytest.raises(EdgesmithError, match=f"vocab_size 100 is too small: byte-level BPE needs at least {MIN_VOCAB}"):
        train_tokenizer(["abc"], vocab_size=100)


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def test_load_errors(tmp_path):
    with pytest.raises(EdgesmithError, match="tokenizer.json: missing"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EdgesmithError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
