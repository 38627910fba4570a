"""The embedded tokenizer: deterministic, cached, with every Keye special token atomic."""

import json

import pytest
from tokenizers import Tokenizer, models

from keye_train.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    REQUIRED_TOKENS,
    SPECIAL_TOKENS,
    KeyeTokenizer,
    default_special_id,
    default_tokenizer,
    default_tokenizer_path,
    train_default_tokenizer,
)


def test_training_is_deterministic_and_sized():
    first, second = train_default_tokenizer(), train_default_tokenizer()
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == DEFAULT_VOCAB_SIZE
    # specials sit after the BPE vocabulary, in the released Qwen3 order
    base = DEFAULT_VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert [first.token_to_id(t) for t, _ in SPECIAL_TOKENS] == list(range(base, DEFAULT_VOCAB_SIZE))
    assert all(first.token_to_id(t) == default_special_id(t) for t, _ in SPECIAL_TOKENS)


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYE_CACHE", str(tmp_path))
    path = default_tokenizer_path()
    assert not path.exists()
    built = default_tokenizer()
    assert path.is_file()
    assert default_tokenizer().to_str() == built.to_str()


def test_special_tokens_are_atomic_and_text_round_trips():
    tok = KeyeTokenizer.default()
    for token in REQUIRED_TOKENS:
        assert tok.encode(f"a{token}b")[1] == tok.token_to_id(token)
    text = "Ünïcode, 数字 12.5 s, emoji \U0001f600, tabs\tand\n\nnewlines"
    assert tok.decode(tok.encode(text)) == text
    reply = "<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>"
    # tool-call and thinking markers are text; chat control tokens are dropped when decoding
    assert tok.decode(tok.encode(reply)) == reply.replace("<|im_end|>", "")


def test_checkpoint_tokenizer_without_keye_tokens_is_refused(tmp_path):
    bare = Tokenizer(models.BPE())
    bare.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(json.loads(bare.to_str())))
    with pytest.raises(ValueError, match=r"lacks Keye's special tokens .*<\|image_pad\|>"):
        KeyeTokenizer.from_file(tmp_path)
    grown = KeyeTokenizer.from_file(tmp_path, add_missing=True)
    assert grown.ids.im_start == bare.token_to_id("<|im_start|>")
    assert grown.ids.frame >= 2 and grown.encode("x<|frame|>")[-1] == grown.ids.frame
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        KeyeTokenizer.from_file(tmp_path / "missing")


def test_save_and_reload(tmp_path):
    tok = KeyeTokenizer.default()
    tok.save(tmp_path)
    again = KeyeTokenizer.from_file(tmp_path)
    assert again.ids == tok.ids and len(again) == len(tok)
