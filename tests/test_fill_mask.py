"""Fill-mask helpers: mask spellings and predictions from a model."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from utils.data.tokenizer import train_wordpiece_tokenizer
from utils.errors import UsageError
from utils.tools.fill_mask import adapt_mask_token, format_predictions, predict_masks


def test_mask_spellings_adapt_to_the_tokenizer():
    assert adapt_mask_token("The [MASK] sat.", "<mask>") == "The <mask> sat."
    assert adapt_mask_token("The <mask> sat.", "[MASK]") == "The [MASK] sat."
    assert adapt_mask_token("The [mask] sat.", "[MASK]") == "The [MASK] sat."
    with pytest.raises(UsageError, match=r"no mask in 'The cat sat.': write \[MASK\]"):
        adapt_mask_token("The cat sat.", "[MASK]")


def test_predictions_are_ranked_probabilities_for_each_mask():
    torch.manual_seed(0)
    tokenizer = train_wordpiece_tokenizer(["the cat sat on the mat"] * 30, vocab_size=60)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64)).eval()
    sentences = ["the [MASK] sat", "the <mask> sat on the [MASK]"]
    predictions = predict_masks(model, tokenizer, sentences, top_k=3)
    assert [len(per_mask) for per_mask in predictions] == [1, 2]
    for per_mask in predictions:
        for candidates in per_mask:
            scores = [c["score"] for c in candidates]
            assert len(scores) == 3 and scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
    text = format_predictions(sentences, predictions)
    assert "mask 2:" in text and text.splitlines()[0] == "the [MASK] sat"
