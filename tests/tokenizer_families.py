"""Tokenizers of every family users bring, built offline with `tokenizers` (and sentencepiece), plus awkward text.

Each builder trains a small vocabulary on generated multilingual text and saves the tokenizer
the way that family's checkpoints hold it (the transformers class of the family, or a plain
tokenizer.json), so that `AutoTokenizer.from_pretrained(directory)` loads it as a user's
would. `save_variant` then rewrites the saved tokenizer.json as other tools leave it:
padding and truncation switched on (sentence-transformers), or a TemplateProcessing
post-processor in place of the family's own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Letters of several scripts, to generate words from (no text from anywhere else).
_SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyz",
    "accented": "éèêëàâäôöûüçñßøåæœ",
    "cyrillic": "абвгдежзийклмнопрстуфхцчшщыэюя",
    "greek": "αβγδεζηθικλμνξοπρστυφχψω",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
    "devanagari": "कखगघचछजझटठडढणतथदधनपफबभमयरलवशसह",
    "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对",
    "hangul": "가나다라마바사아자차카타파하고노도로모보소오조초코토포호",
    "thai": "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮ",
}
_EMOJI = ["😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️"]


def words(rng: random.Random, n: int) -> list[str]:
    """`n` generated words, each from one script, a few of them emoji, numbers or punctuated."""
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.05:
            out.append(rng.choice(_EMOJI))
        elif kind < 0.08:
            out.append(str(rng.randint(0, 10**rng.randint(1, 6))))
        else:
            letters = _SCRIPTS[rng.choice(list(_SCRIPTS))]
            word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 8)))
            out.append(word.capitalize() + rng.choice(["", "", "", ",", ".", "!", "?", ";"]))
    return out


def training_text(seed: int = 0, n_lines: int = 1500) -> list[str]:
    """Lines to train the small vocabularies on."""
    rng = random.Random(seed)
    return [" ".join(words(rng, rng.randint(3, 20))) for _ in range(n_lines)]


def awkward_texts(seed: int = 1) -> list[str]:
    """Rows that test exactness: a 10k+ token document, blank rows, many scripts, specials spelled out."""
    rng = random.Random(seed)
    long_document = " ".join(words(rng, 6000))
    return [
        "The quick brown fox, in plain ASCII.",
        "",
        "   ",
        "\t \n",
        "\u3000",  # an ideographic space only: blank
        long_document,
        "Съешь же ещё этих мягких французских булок.",
        "Ελληνικά γράμματα και τόνοι.",
        "مرحبا بالعالم — نص عربي.",
        "שלום עולם בעברית.",
        "नमस्ते दुनिया, हिन्दी पाठ।",
        "日本語のテキストと中文文本混在。",
        "한국어 문장입니다.",
        "ข้อความภาษาไทยไม่มีช่องว่าง",
        "Emoji 😀🚀 and families 👨‍👩‍👧 and flags 🇫🇷.",
        "Combining e\u0301 and precomposed é; ligature ﬁ, circled ①, full-width ＡＢＣ.",
        "  leading and trailing spaces  ",
        "a" * 400,  # one very long word
        "Special tokens spelled out: [MASK] <mask> [PAD] <pad> [CLS] <s> </s> [UNK] <unk>.",
        "zero\u200bwidth\u200bspace and a soft\u00adhyphen",
        *(" ".join(words(rng, rng.randint(1, 40))) for _ in range(60)),
    ]


# --- the families --------------------------------------------------------------------------------

def _train(tokenizer, trainer, seed: int = 0):
    tokenizer.train_from_iterator(training_text(seed), trainer=trainer)
    return tokenizer


def _json(tokenizer) -> dict:
    return json.loads(tokenizer.to_str())


def build_bert_wordpiece(directory: Path, vocab_size: int = 800) -> Path:
    """BERT: WordPiece, uncased, [CLS] text [SEP]; saved by transformers' BertTokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    _train(tokenizer, trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    BertTokenizer(vocab=tokenizer.get_vocab(), do_lower_case=True).save_pretrained(directory)
    return directory


def build_roberta_bpe(directory: Path, vocab_size: int = 1000) -> Path:
    """RoBERTa: byte-level BPE, <s> text </s>, <mask> that takes the space before it; RobertaTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    _train(tokenizer, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    model = _json(tokenizer)["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    RobertaTokenizer(vocab=model["vocab"], merges=merges).save_pretrained(directory)
    return directory


def _unigram(special_tokens: list[str], unk: str, lowercase: bool = False, vocab_size: int = 1000):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    _train(tokenizer, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special_tokens, unk_token=unk,
                                              show_progress=False))
    return [tuple(piece) for piece in _json(tokenizer)["model"]["vocab"]]


def build_xlmr_unigram(directory: Path) -> Path:
    """XLM-R: SentencePiece-style Unigram with Metaspace (▁), <s> text </s>; XLMRobertaTokenizer."""
    from transformers import XLMRobertaTokenizer

    vocab = _unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>")
    XLMRobertaTokenizer(vocab=vocab).save_pretrained(directory)
    return directory


def build_albert_unigram(directory: Path) -> Path:
    """ALBERT: lowercased Unigram, [CLS] text [SEP], <pad>/<unk>/[MASK]; AlbertTokenizer."""
    from transformers import AlbertTokenizer

    vocab = _unigram(["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], "<unk>", lowercase=True)
    AlbertTokenizer(vocab=vocab).save_pretrained(directory)
    return directory


def build_sentencepiece_bpe(directory: Path, vocab_size: int = 1000) -> Path:
    """SentencePiece-style BPE (Metaspace, byte fallback off), <s> text </s>, a plain tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    _train(tokenizer, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tokenizer.token_to_id("<s>")), ("</s>", tokenizer.token_to_id("</s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                            sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
                            mask_token="<mask>").save_pretrained(directory)
    return directory


def build_modernbert_bpe(directory: Path, vocab_size: int = 1000) -> Path:
    """ModernBERT: byte-level BPE with BERT's specials at the end of the vocab, [MASK] taking the space before it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    _train(tokenizer, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                          special_tokens=["<|endoftext|>"]))
    tokenizer.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", AddedToken("[MASK]", lstrip=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                            unk_token="[UNK]", mask_token="[MASK]").save_pretrained(directory)
    return directory


def build_sentencepiece_model(directory: Path) -> Path:
    """A checkpoint with only a SentencePiece `spiece.model` (old ALBERT/XLNet style): transformers converts it."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(training_text()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "spiece"), vocab_size=800, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>", bos_piece="[CLS]",
        eos_piece="[SEP]", user_defined_symbols=["[MASK]"], character_coverage=1.0, minloglevel=2)
    corpus.unlink()
    (directory / "spiece.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "AlbertTokenizer"}))
    return directory


def build_bert_slow(directory: Path) -> Path:
    """A slow (pure Python) WordPiece tokenizer's files: the vocab.txt that BertTokenizerLegacy reads."""
    fast = build_bert_wordpiece(directory / "fast")
    vocab = sorted(json.loads((fast / "tokenizer.json").read_text())["model"]["vocab"].items(), key=lambda kv: kv[1])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(token for token, _ in vocab) + "\n", encoding="utf-8")
    return directory


def load_slow(directory: Path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    return BertTokenizerLegacy(str(directory / "vocab.txt"))


FAMILIES = {
    "bert-wordpiece": build_bert_wordpiece,
    "roberta-bytelevel-bpe": build_roberta_bpe,
    "xlmr-unigram": build_xlmr_unigram,
    "albert-unigram": build_albert_unigram,
    "sentencepiece-bpe": build_sentencepiece_bpe,
    "modernbert-bytelevel-bpe": build_modernbert_bpe,
    "sentencepiece-model": build_sentencepiece_model,
}

# What other tools leave in tokenizer.json.
PADDING = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
           "pad_type_id": 0, "pad_token": "[PAD]"}
TRUNCATION = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}


def save_variant(source: Path, target: Path, variant: str) -> Path:
    """Copy a saved tokenizer to `target`, changed as `variant` says: "saved" (as is), "padded" (Fixed
    padding and truncation at 16, as sentence-transformers saves them) or "template" (a TemplateProcessing
    post-processor written out with the family's own special tokens)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, target)
    if variant == "saved":
        return target
    tokenizer_json_path = target / "tokenizer.json"
    if not tokenizer_json_path.exists():  # only a spiece.model: let transformers write the tokenizer.json
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    tokenizer_json = json.loads(tokenizer_json_path.read_text(encoding="utf-8"))
    loaded = AutoTokenizer.from_pretrained(source)
    if variant == "padded":
        tokenizer_json["padding"] = {**PADDING, "pad_id": loaded.pad_token_id, "pad_token": loaded.pad_token}
        tokenizer_json["truncation"] = TRUNCATION
    elif variant == "template":
        cls, sep = loaded.cls_token, loaded.sep_token
        tokenizer_json["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": cls, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": sep, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": cls, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": sep, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": sep, "type_id": 1}}],
            "special_tokens": {token: {"id": token, "ids": [loaded.convert_tokens_to_ids(token)], "tokens": [token]}
                               for token in {cls, sep}},
        }
        # Loaded by the family's class, the template would be replaced by the class's own post-processor
        # (transformers 5 rebuilds it): the generic class keeps tokenizer.json as it is.
        config_path = target / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config_path.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}), encoding="utf-8")
    tokenizer_json_path.write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    return target
