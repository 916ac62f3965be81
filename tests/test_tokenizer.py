"""Training a WordPiece tokenizer from scratch, and refusing tokenizers without a mask token."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from utils.data.tokenizer import check_mask_token, train_wordpiece_tokenizer
from utils.errors import UsageError


def test_trained_tokenizer_wraps_text_and_reloads(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog."] * 50 + ["Pack my box with five dozen jugs."] * 50
    tokenizer = train_wordpiece_tokenizer(iter(texts), vocab_size=200, model_max_length=128)
    ids = tokenizer("the lazy dog")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the lazy dog"  # lowercased
    assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token == "[PAD]"
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("the lazy dog [MASK]")["input_ids"][-2] == reloaded.mask_token_id
    assert reloaded.model_max_length == 128


def test_cased_tokenizer_keeps_case():
    tokenizer = train_wordpiece_tokenizer(["Paris Berlin paris"] * 20, vocab_size=100, lowercase=False)
    assert "Paris" in tokenizer.tokenize("Paris")


def test_tokenizer_without_mask_token_is_refused():
    base = train_wordpiece_tokenizer(["a b c"] * 10, vocab_size=40)
    no_mask = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(UsageError, match=r"the tokenizer from `gpt2` \(--tokenizer_name\) has no mask token"):
        check_mask_token(no_mask, "`gpt2` (--tokenizer_name)")
    check_mask_token(base, "trained")  # no error
