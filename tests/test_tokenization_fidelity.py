"""Training sees exactly the ids `tokenizer(text)` gives: every tokenization path, every tokenizer family.

The matrix: 7 fast tokenizer families (WordPiece, byte-level BPE as RoBERTa and ModernBERT
use it, SentencePiece-style Unigram as XLM-R and ALBERT, SentencePiece-style BPE, and a
bare `spiece.model`), each as saved, with padding and truncation switched on in its
tokenizer.json (as sentence-transformers saves them), and with a TemplateProcessing
post-processor; plus a slow (pure Python) tokenizer. Each through packed blocks, blocks
with whole-word starts, line_by_line (with and without padding, with word starts) and streaming, compared
token for token with the wrapper on texts that include a 28k-token document, blank rows,
ten scripts, emoji and special tokens spelled out in the text.
"""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerFast

from utils.data.encoding import encode_to_arrays, exact_copy, is_exact, own_padding
from utils.data.pipeline import preprocess_datasets, word_starts_of
from utils.data.streaming import iter_blocks
from utils.errors import UsageError

from .conftest import write_repetitive_corpus
from .tokenizer_families import (
    FAMILIES,
    awkward_texts,
    build_bert_slow,
    build_bert_wordpiece,
    load_slow,
    save_variant,
)

BLOCK = 64
LINE = 32
TEXTS = awkward_texts()
NON_BLANK = [t for t in TEXTS if t and not t.isspace()]
VARIANTS = ("saved", "padded", "template")
FAST_CASES = [(family, variant) for family in FAMILIES for variant in VARIANTS]
SLOW_CASE = ("bert-slow", "python")
PATHS = ("packed", "word_starts", "line_by_line", "line_by_line_padded", "line_by_line_words", "streaming")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family, variant -> a function that loads a fresh tokenizer object (built once, on first use)."""
    root = tmp_path_factory.mktemp("families")
    built: dict = {}

    def load(family: str, variant: str):
        key = (family, variant)
        if key not in built:
            if family == "bert-slow":
                built[key] = build_bert_slow(root / "bert-slow")
            else:
                source = root / family
                if not source.exists():
                    FAMILIES[family](source)
                built[key] = save_variant(source, root / f"{family}-{variant}", variant)
        if family == "bert-slow":
            return load_slow(built[key])
        return AutoTokenizer.from_pretrained(built[key])

    return load


def args(**overrides):
    values = dict(dataset_name=None, dataset_config_name=None, train_file=None, validation_file=None,
                  streaming=False, validation_split_percentage=0, text_column_name=None, whole_word_mask=False,
                  line_by_line=False, pad_to_max_length=False, preprocessing_num_workers=None, overwrite_cache=False)
    values.update(overrides)
    return SimpleNamespace(**values)


def raw_texts() -> DatasetDict:
    return DatasetDict({"train": Dataset.from_dict({"text": TEXTS})})


def reference(tokenizer, **kwargs) -> list:
    """What the tokenizer's own __call__ gives, one text at a time (a separate tokenizer object)."""
    return [tokenizer(text, **kwargs) for text in NON_BLANK]


# Word starts need a fast tokenizer (word ids): run_mlm refuses a slow one with --whole_word_mask.
MATRIX = [(*case, path) for case in FAST_CASES for path in PATHS] + [
    (*SLOW_CASE, p) for p in PATHS if p not in ("word_starts", "line_by_line_words")]


@pytest.mark.parametrize("family, variant, path", MATRIX)
def test_every_path_gives_the_ids_the_tokenizer_gives(families, family, variant, path):
    tokenizer = families(family, variant)
    padding_before = own_padding(tokenizer)
    if variant == "padded":  # the case under test is real: as loaded, the backend pads and cuts every text
        assert padding_before == "pads every text to 16 tokens and truncates every text at 16 tokens"
        assert len(tokenizer.backend_tokenizer.encode("a").ids) == 16
        assert len(tokenizer.backend_tokenizer.encode(NON_BLANK[1]).ids) == 16
    if variant == "template":
        assert type(tokenizer.backend_tokenizer.post_processor).__name__ == "TemplateProcessing"
    expected_rows = reference(families(family, variant))
    flat = [i for row in expected_rows for i in row["input_ids"]]
    assert max(len(row["input_ids"]) for row in expected_rows) > 10_000  # the long document is long

    if path in ("packed", "word_starts"):
        stats = {}
        blocks = preprocess_datasets(raw_texts(), tokenizer, args(whole_word_mask=path == "word_starts"), BLOCK,
                                     stats)["train"]
        n = len(flat) // BLOCK
        assert np.array(blocks["input_ids"]).ravel().tolist() == flat[: n * BLOCK]
        assert stats["train"]["tokens"] == len(flat) and stats["train"]["tokens_lost"] == len(flat) - n * BLOCK
        assert stats["train"]["characters"] == sum(map(len, TEXTS))
        if path == "word_starts":  # where the tokenizer's own words begin, token for token
            starts = [s for row in expected_rows for s in word_starts_of(row.word_ids())]
            assert np.array(blocks["word_starts"]).ravel().tolist() == starts[: n * BLOCK]
            assert 0 < sum(starts) < len(starts)
    elif path.startswith("line_by_line"):
        pad, words = path.endswith("padded"), path.endswith("words")
        lines = preprocess_datasets(raw_texts(), tokenizer, args(line_by_line=True, pad_to_max_length=pad,
                                                                whole_word_mask=words), LINE)["train"]
        rows = lines["input_ids"]
        expected = reference(families(family, variant), truncation=True, max_length=LINE,
                             padding="max_length" if pad else False)
        assert rows == [row["input_ids"] for row in expected]
        if words:
            assert lines["word_starts"] == [word_starts_of(row.word_ids()) for row in expected]
        assert pad or max(map(len, rows)) == LINE > min(map(len, rows))
    else:
        blocks = np.stack(list(iter_blocks(iter(TEXTS), tokenizer, BLOCK)))
        assert blocks.ravel().tolist() == flat[: len(flat) // BLOCK * BLOCK]
    # The caller's tokenizer object is as it was: its own padding is switched off on a copy only.
    assert own_padding(tokenizer) == padding_before


def test_the_text_may_spell_the_pad_token(families):
    """'[PAD]' written in the text is a pad id the text gives: the padding guard lets it through."""
    tokenizer = families("bert-wordpiece", "padded")
    flat = [i for row in reference(families("bert-wordpiece", "saved")) for i in row["input_ids"]]
    assert tokenizer.pad_token_id in flat
    blocks = preprocess_datasets(raw_texts(), tokenizer, args(), BLOCK)["train"]
    assert tokenizer.pad_token_id in np.array(blocks["input_ids"])


def test_two_workers_tokenize_with_the_exact_copy(families, tmp_path):
    """Workers get the tokenizer pickled: the copy they get has no padding either."""
    tokenizer = families("roberta-bytelevel-bpe", "padded")
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n", encoding="utf-8")
    from utils.data.pipeline import load_raw_datasets

    raw = load_raw_datasets(args(train_file=[str(path)]), SimpleNamespace(cache_dir=None, token=None))
    lines = [t for t in raw["train"]["text"] if t and not t.isspace()]
    flat = [i for t in lines for i in families("roberta-bytelevel-bpe", "saved")(t)["input_ids"]]
    blocks = preprocess_datasets(raw, tokenizer, args(preprocessing_num_workers=2, overwrite_cache=True), BLOCK)
    assert np.array(blocks["train"]["input_ids"]).ravel().tolist() == flat[: len(flat) // BLOCK * BLOCK]


def test_a_post_processor_that_adds_padding_is_refused(tmp_path):
    """The guard: blocks never hold pad ids that the text does not spell, whatever the tokenizer does."""
    source = build_bert_wordpiece(tmp_path / "bert")
    tokenizer_json = json.loads((source / "tokenizer.json").read_text())
    template = tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"SpecialToken": {"id": "[PAD]", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]}
                           for t, i in (("[CLS]", 2), ("[SEP]", 3), ("[PAD]", 0))},
    }
    assert template["single"][-1]["SpecialToken"]["id"] == "[PAD]"
    (source / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    # The generic class keeps tokenizer.json's post-processor (BertTokenizer would rebuild its own).
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert tokenizer("plain text")["input_ids"][-1] == tokenizer.pad_token_id
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["plain text with no pad token"] * 20})})
    for data_args in (args(), args(whole_word_mask=True), args(line_by_line=True)):
        with pytest.raises(UsageError, match=r"gave 20 pad tokens \('\[PAD\]', id 0\) where the text spells 0: "
                                             r"the tokenizer pads on its own"):
            preprocess_datasets(raw, tokenizer, data_args, 8)
    with pytest.raises(UsageError, match="pads on its own"):
        list(iter_blocks(iter(["plain text"] * 5), tokenizer, 4))


def test_encode_to_arrays_refuses_a_backend_that_pads(families):
    tokenizer = families("bert-wordpiece", "padded")
    with pytest.raises(ValueError, match="pads every text to 16 tokens .*exact_copy"):
        encode_to_arrays(["a b c"], tokenizer, "uint16")
    exact = exact_copy(tokenizer)
    assert is_exact(exact) and not is_exact(tokenizer) and own_padding(exact) is None
    ids, offsets = encode_to_arrays(["a b c", NON_BLANK[1]], exact, "uint16")
    assert offsets[1] < 16 and offsets[2] - offsets[1] > 16  # not padded, not cut


def test_split_special_tokens_is_honoured(families):
    """A tokenizer configured to split special tokens spelled in the text: the copy does as the wrapper does."""
    tokenizer = families("modernbert-bytelevel-bpe", "saved")
    tokenizer.split_special_tokens = True
    text = "a [MASK] b"
    exact = exact_copy(tokenizer)
    ids, _ = encode_to_arrays([text], exact, "uint16")
    assert ids.tolist() == tokenizer(text)["input_ids"]
    assert tokenizer.mask_token_id not in ids.tolist()


# --- a whole run: the sentence-transformers case --------------------------------------------------

def sentence_transformers_checkpoint(directory: Path) -> Path:
    """A BERT encoder with no MLM head and a tokenizer.json that pads and truncates at 16, as ST saves them."""
    source = build_bert_wordpiece(directory / "tokenizer-source")
    variant = save_variant(source, directory / "st-model", "padded")
    tokenizer = AutoTokenizer.from_pretrained(variant)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(variant)
    return variant


def test_run_mlm_trains_on_the_texts_tokens_not_on_a_tokenizers_padding(tmp_path, caplog):
    import run_mlm

    corpus = write_repetitive_corpus(tmp_path / "train.txt", n_lines=600)
    checkpoint = sentence_transformers_checkpoint(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert own_padding(tokenizer) is not None
    lines = [t for t in corpus.read_text().splitlines() if t.strip()]
    n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in lines)  # the exact ids, for all lines
    output = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        metrics = run_mlm.main([
            "--model_name_or_path", str(checkpoint), "--train_file", str(corpus), "--validation_split_percentage", "10",
            "--max_seq_length", "32", "--do_train", "--do_eval", "--max_steps", "5", "--per_device_train_batch_size",
            "8", "--output_dir", str(output), "--report_to", "none", "--save_strategy", "no", "--precision", "fp32",
            "--disable_tqdm", "true"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("pads every text to 16 tokens and truncates every text at 16 tokens on its own" in m
               and "the training data is tokenized without that" in m for m in messages)
    n_valid = len(lines) // 10
    valid_tokens = sum(len(tokenizer(t)["input_ids"]) for t in lines[:n_valid])
    # One padded 16-token row per line would give 540 + 60 blocks; the texts' own tokens give this many.
    assert metrics["train_samples"] == (n_tokens - valid_tokens) // 32
    assert metrics["eval_samples"] == valid_tokens // 32
    token_lines = [m for m in messages if m.startswith("train: ") and "characters of text" in m]
    assert token_lines and f"{n_tokens - valid_tokens:,} tokens from" in token_lines[0]
    card = (output / "README.md").read_text()
    assert f"{n_tokens - valid_tokens:,} tokens" in card
    # The tokenizer saved with the model is the user's, padding included (sentence-transformers needs it).
    assert json.loads((output / "tokenizer.json").read_text())["padding"]["strategy"] == {"Fixed": 16}


def test_prepared_data_holds_exact_ids_and_old_padded_preparations_are_refused(tmp_path):
    from utils.data.prepared import load_prepared
    from utils.tools import prepare_dataset

    corpus = write_repetitive_corpus(tmp_path / "train.txt", n_lines=300)
    checkpoint = sentence_transformers_checkpoint(tmp_path)
    prepared = tmp_path / "prepared"
    manifest = prepare_dataset.main(["--model_name_or_path", str(checkpoint), "--train_file", str(corpus),
                                     "--validation_split_percentage", "0", "--max_seq_length", "32",
                                     "--tokenized_dataset_path", str(prepared), "--output_dir", str(tmp_path / "o")])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    flat = [i for t in corpus.read_text().splitlines() if t.strip() for i in tokenizer(t)["input_ids"]]
    assert manifest["splits"]["train"]["blocks"] == len(flat) // 32
    from datasets import load_from_disk

    blocks = np.array(load_from_disk(str(prepared))["train"]["input_ids"])
    assert blocks.ravel().tolist() == flat[: len(flat) // 32 * 32]
    assert manifest["splits"]["train"]["tokens"] == len(flat)
    data_args = SimpleNamespace(max_seq_length=None, whole_word_mask=False, dataset_name=None, text_column_name=None,
                                dataset_config_name=None, train_file=None, validation_file=None, builtin_corpus=None,
                                validation_split_percentage=0)
    load_prepared(str(prepared), tokenizer, data_args)  # accepted
    load_prepared(str(prepared), exact_copy(tokenizer), data_args)  # same fingerprint without padding
    # What an earlier version wrote: format 1, with the tokenizer's padding applied to every text.
    manifest_path = prepared / "manifest.json"
    manifest["format_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"prepared by an earlier version that kept its tokenizer's own padding and "
                                         r"truncation \(padding .*Fixed.*16.*\): its blocks hold padding"):
        load_prepared(str(prepared), tokenizer, data_args)
    # A format-1 preparation whose tokenizer did not pad has exact ids: still accepted.
    saved = prepared / "tokenizer" / "tokenizer.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "padding": None, "truncation": None}))
    load_prepared(str(prepared), tokenizer, data_args)


def test_a_trained_tokenizer_is_exact():
    from utils.data.tokenizer import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(iter(NON_BLANK * 2), vocab_size=300)
    assert is_exact(tokenizer) and own_padding(tokenizer) is None
    ids, offsets = encode_to_arrays(NON_BLANK, tokenizer, "uint16")
    assert ids.tolist() == [i for t in NON_BLANK for i in tokenizer(t)["input_ids"]]
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
