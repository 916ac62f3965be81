"""From scratch, the tokenizer of the family's own kind: WordPiece, byte-level BPE or SentencePiece-style Unigram,
with the family's special tokens and class, as a later load gives it."""

import json
import math

import pytest
from transformers import AutoTokenizer

from run_mlm import main
from utils.data.tokenizer_kinds import FAMILIES, choose, kind_of, train_tokenizer, unknown_rate
from utils.errors import UsageError

from .conftest import tiny_run_args
from .tokenizer_families import awkward_texts, training_text

HELD_OUT = [t for t in awkward_texts(seed=5) if t.strip()]
# What each family's pretrained checkpoints load as (transformers 5) and mask with.
EXPECTED = {
    "bert": ("wordpiece", "BertTokenizer", "[MASK]", True),
    "distilbert": ("wordpiece", "DistilBertTokenizer", "[MASK]", True),
    "electra": ("wordpiece", "BertTokenizer", "[MASK]", True),  # ElectraTokenizer is BertTokenizer in transformers 5
    "roberta": ("bpe", "RobertaTokenizer", "<mask>", False),
    "modernbert": ("bpe", "TokenizersBackend", "[MASK]", False),  # PreTrainedTokenizerFast, as ModernBERT's
    "deberta": ("bpe", "DebertaTokenizer", "[MASK]", False),
    "xlm-roberta": ("unigram", "XLMRobertaTokenizer", "<mask>", False),
    "camembert": ("unigram", "CamembertTokenizer", "<mask>", False),
    "albert": ("unigram", "AlbertTokenizer", "[MASK]", True),
    "deberta-v2": ("unigram", "DebertaV2Tokenizer", "[MASK]", False),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model type -> (tokenizer as trained, as loaded back from disk)."""
    root = tmp_path_factory.mktemp("kinds")
    texts = training_text(seed=0, n_lines=1500)
    out = {}
    for model_type in EXPECTED:
        tokenizer = train_tokenizer(iter(texts), model_type, vocab_size=800, model_max_length=128)
        tokenizer.save_pretrained(root / model_type)
        out[model_type] = tokenizer, AutoTokenizer.from_pretrained(root / model_type)
    return out


@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_each_family_gets_its_own_kind_class_and_specials(trained, model_type):
    kind, class_name, mask, lowercase = EXPECTED[model_type]
    tokenizer, loaded = trained[model_type]
    assert FAMILIES[model_type].kind == kind and kind_of(loaded) == kind
    assert type(loaded).__name__ == class_name and loaded.mask_token == mask
    assert (loaded("ABC")["input_ids"] == loaded("abc")["input_ids"]) == lowercase
    # What was trained is what a later load gives, token for token, on text it never saw.
    for text in HELD_OUT:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = loaded("a b")["input_ids"]
    assert ids[0] == loaded.cls_token_id and ids[-1] == loaded.sep_token_id
    # The mask stands for a whole word: written after a space it is one token, like the word it replaces.
    pieces = loaded.tokenize(f"is {mask} today")
    at = [i for i, piece in enumerate(pieces) if piece.strip() == mask]
    assert len(at) == 1 and pieces[at[0] - 1] not in ("Ġ", "▁")  # no bare space left before it


@pytest.mark.parametrize("model_type", ["roberta", "modernbert", "deberta"])
def test_byte_level_bpe_round_trips_any_text_with_no_unknown_token(trained, model_type):
    _, loaded = trained[model_type]
    texts = [t for t in HELD_OUT if "<" not in t and "[" not in t]  # special tokens spelled out aside
    assert any("😀" in t for t in texts) and any("日本語" in t for t in texts)
    for text in texts:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    assert unknown_rate(loaded, texts) == 0.0


@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta", "albert"])
def test_unknown_rate_is_measured(trained, model_type):
    _, loaded = trained[model_type]
    rate = unknown_rate(loaded, HELD_OUT)
    assert 0 < rate < 0.05  # a vocabulary of 800 on ten scripts misses a few characters, not most


def test_another_kind_for_a_family_keeps_its_special_tokens():
    texts = training_text(seed=1, n_lines=600)
    unigram_bert = train_tokenizer(iter(texts), "bert", "unigram", vocab_size=400)
    assert kind_of(unigram_bert) == "unigram" and unigram_bert.mask_token == "[MASK]"
    assert unigram_bert("a b")["input_ids"][0] == unigram_bert.cls_token_id
    wordpiece_roberta = train_tokenizer(iter(texts), "roberta", "wordpiece", vocab_size=400)
    assert kind_of(wordpiece_roberta) == "wordpiece" and wordpiece_roberta.mask_token == "<mask>"
    assert wordpiece_roberta.convert_ids_to_tokens(wordpiece_roberta("a")["input_ids"])[::2] == ["<s>", "</s>"]


def test_a_cased_family_told_to_lowercase_is_refused():
    with pytest.raises(UsageError, match=r"--tokenizer_lowercase true: RobertaTokenizer .* is cased"):
        choose("roberta", "auto", True)
    assert choose("roberta", "wordpiece", True) == ("wordpiece", True, "PreTrainedTokenizerFast")
    assert choose("albert") == ("unigram", True, "AlbertTokenizer")
    assert choose("gpt-unknown") == ("wordpiece", True, "BertTokenizer")


def test_training_reads_a_bounded_sample_evenly(tmp_path):
    from datasets import Dataset

    from utils.data.tokenizer import _text_batches

    dataset = Dataset.from_dict({"text": [f"line {i} " + "x" * 95 for i in range(10_000)]})  # ~1 MB
    batches = list(_text_batches(dataset, "text", max_chars=300_000))
    # 1.04 M characters over a budget of 0.3 M: every 4th batch of 1000 texts, from start to end.
    assert [batch[0].split(" ")[1] for batch in batches] == ["0", "4000", "8000"]


FILL = {"<mask>": "the cat sees the <mask> ball .", "[MASK]": "the cat sees the [MASK] ball ."}


@pytest.mark.parametrize("model_type, extra", [
    ("roberta", []),
    ("xlm-roberta", []),
    ("albert", ["--whole_word_mask"]),
    ("modernbert", ["--whole_word_mask"]),
])
def test_from_scratch_run_trains_its_familys_tokenizer(corpus, tmp_path, model_type, extra, capsys):
    kind, class_name, mask, _ = EXPECTED[model_type]
    overrides = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
                 "max_position_embeddings=64")
    if model_type == "albert":
        overrides += ",embedding_size=32"
    args = tiny_run_args(tmp_path / "out", corpus, "--model_type", model_type, "--config_overrides", overrides,
                         "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", "60",
                         "--fill_mask_sentences", FILL[mask], *extra)
    metrics = main(args)
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] < evals[0] - 0.5  # it learns
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert type(saved).__name__ == class_name and saved.mask_token == mask and kind_of(saved) == kind
    assert f"{FILL[mask]}\n  -> " in capsys.readouterr().out  # fill-mask with the family's own mask token
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"trained on the training text ({class_name}, mask {mask}" in card


def test_prepared_data_of_another_kind_is_refused(corpus, tmp_path):
    from utils.tools.prepare_dataset import main as prepare

    data = tmp_path / "data"
    prepare(tiny_run_args(tmp_path / "unused", corpus, "--tokenized_dataset_path", str(data)))
    args = tiny_run_args(tmp_path / "out", corpus, "--tokenized_dataset_path", str(data), "--tokenizer_type",
                         "unigram")
    args[args.index("--train_file"): args.index("--train_file") + 2] = []
    with pytest.raises(UsageError, match=r"--tokenizer_type unigram: --tokenized_dataset_path .* was tokenized "
                                         r"with a wordpiece tokenizer"):
        main(args)
    assert json.loads((data / "manifest.json").read_text())["tokenizer_kind"] == "wordpiece"
