"""Training a tokenizer of the kind a model family uses: WordPiece, byte-level BPE or SentencePiece-style Unigram.

A family's pretrained checkpoints load as one transformers class (BertTokenizer,
RobertaTokenizer, XLMRobertaTokenizer, AlbertTokenizer, ...), with its own special tokens,
normalisation and post-processor. In transformers 5 those classes build that pipeline
themselves from a vocabulary, and rebuild it when they load one. So a tokenizer is trained
here with the very normaliser and pre-tokeniser its class will use (taken from an instance
of the class with only the special tokens), and the class is then built from the trained
vocabulary: what training saw is what every later load gives. When `--tokenizer_type`
departs from the family's own kind, a generic `PreTrainedTokenizerFast` carries the whole
pipeline in its tokenizer.json, with the family's special tokens.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from utils.errors import UsageError

logger = logging.getLogger(__name__)

KINDS = ("wordpiece", "bpe", "unigram")
KIND_NAMES = {"wordpiece": "WordPiece", "bpe": "byte-level BPE", "unigram": "Unigram (SentencePiece-style)"}

# Special tokens in vocabulary order, by role.
BERT = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
ROBERTA = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
           "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
ALBERT = {"pad_token": "<pad>", "unk_token": "<unk>", "cls_token": "[CLS]", "sep_token": "[SEP]",
          "mask_token": "[MASK]"}
DEBERTA_V3 = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]",
              "mask_token": "[MASK]"}


@dataclass(frozen=True)
class Family:
    """How a model family's pretrained tokenizers are made."""

    kind: str          # wordpiece, bpe or unigram
    class_name: str    # the transformers class its checkpoints load as
    specials: dict     # role -> token, in vocabulary order
    lowercase: bool    # whether its usual checkpoints lowercase
    can_lowercase: bool = True  # whether the class can be told to


FAMILIES = {
    **dict.fromkeys(("bert", "megatron-bert", "mobilebert", "convbert", "nystromformer", "yoso", "squeezebert",
                     "funnel", "layoutlm"), Family("wordpiece", "BertTokenizer", BERT, True)),
    "distilbert": Family("wordpiece", "DistilBertTokenizer", BERT, True),
    "electra": Family("wordpiece", "ElectraTokenizer", BERT, True),
    **dict.fromkeys(("roberta", "roberta-prelayernorm", "longformer", "data2vec-text", "ibert"),
                    Family("bpe", "RobertaTokenizer", ROBERTA, False, can_lowercase=False)),
    "deberta": Family("bpe", "DebertaTokenizer", BERT, False, can_lowercase=False),
    "modernbert": Family("bpe", "PreTrainedTokenizerFast", BERT, False),
    **dict.fromkeys(("xlm-roberta", "xlm-roberta-xl", "xmod"),
                    Family("unigram", "XLMRobertaTokenizer", ROBERTA, False, can_lowercase=False)),
    "camembert": Family("unigram", "CamembertTokenizer", ROBERTA, False, can_lowercase=False),
    "albert": Family("unigram", "AlbertTokenizer", ALBERT, True),
    "deberta-v2": Family("unigram", "DebertaV2Tokenizer", DEBERTA_V3, False),
}
# Model types not listed: BERT's WordPiece, as this project always did.
DEFAULT_FAMILY = Family("wordpiece", "BertTokenizer", BERT, True)


def family_of(model_type: str | None) -> Family:
    return FAMILIES.get(model_type or "bert", DEFAULT_FAMILY)


def choose(model_type: str | None, kind: str = "auto", lowercase: bool | None = None) -> tuple[str, bool, str]:
    """(kind, lowercase, class name) for `--model_type`, `--tokenizer_type` and `--tokenizer_lowercase`."""
    family = family_of(model_type)
    kind = family.kind if kind == "auto" else kind
    lowercase = family.lowercase if lowercase is None else lowercase
    own_class = kind == family.kind
    if own_class and lowercase and not family.can_lowercase:
        raise UsageError(f"--tokenizer_lowercase true: {family.class_name} (the tokenizer of --model_type "
                         f"{model_type}) is cased and cannot lowercase; drop the flag, or pick another "
                         "--tokenizer_type")
    return kind, lowercase, family.class_name if own_class else "PreTrainedTokenizerFast"


@functools.cache
def nmt_nfkc_charsmap() -> bytes | None:
    """SentencePiece's NFKC normalisation table (what XLM-R's and ALBERT's tokenizers apply), if sentencepiece is here.

    The table is the same for every model; a throwaway model trained on a few letters carries it.
    """
    try:
        import io

        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return None
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g h"] * 8), model_writer=model,
                                   vocab_size=12, model_type="char", normalization_rule_name="nmt_nfkc",
                                   minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def _class_options(family: Family, lowercase: bool, model_max_length: int) -> dict:
    from tokenizers import AddedToken

    options = {"model_max_length": model_max_length}
    if family.kind != "wordpiece":
        # The mask takes the space before it, as RoBERTa's and XLM-R's do: in "is <mask>." it stands for
        # the word " Paris" (one token with its space), which is what training masked.
        options["mask_token"] = AddedToken(family.specials["mask_token"], lstrip=True, rstrip=False)
    if family.kind == "wordpiece" or family.class_name in ("AlbertTokenizer", "DebertaV2Tokenizer"):
        options["do_lower_case"] = lowercase
    if family.class_name in ("XLMRobertaTokenizer", "CamembertTokenizer", "AlbertTokenizer"):
        charsmap = nmt_nfkc_charsmap()
        if charsmap is not None:
            options["_spm_precompiled_charsmap"] = charsmap
        else:
            logger.warning("sentencepiece is not installed: the %s trained here has no NFKC normalisation "
                           "(pip install sentencepiece for the family's own)", family.class_name)
    if family.class_name == "DebertaV2Tokenizer":
        options["unk_id"] = list(family.specials.values()).index(family.specials["unk_token"])
    return options


def _family_class(family: Family, vocab, merges, lowercase: bool, model_max_length: int):
    import transformers

    cls = getattr(transformers, family.class_name)
    merges_arg = {"merges": merges} if family.kind == "bpe" else {}
    return cls(vocab=vocab, **merges_arg, **_class_options(family, lowercase, model_max_length))


def _ordered_specials(specials: dict) -> list[str]:
    return list(dict.fromkeys(specials.values()))


def _minimal_vocab(kind: str, specials: dict):
    tokens = _ordered_specials(specials)
    return [(t, 0.0) for t in tokens] if kind == "unigram" else {t: i for i, t in enumerate(tokens)}


def _generic_pipeline(kind: str, lowercase: bool):
    """Normaliser, pre-tokeniser and decoder of a generic tokenizer of `kind`."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    if kind == "wordpiece":
        return normalizers.BertNormalizer(lowercase=lowercase), pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    steps = []
    if kind == "unigram":
        charsmap = nmt_nfkc_charsmap()
        steps.append(normalizers.Precompiled(charsmap) if charsmap else normalizers.NFKC())
    if lowercase:
        steps.append(normalizers.Lowercase())
    normalizer = normalizers.Sequence(steps) if steps else None
    if kind == "bpe":
        return normalizer, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return (normalizer, pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()]),
            decoders.Metaspace())


def train_tokenizer(texts: Iterable, model_type: str | None = None, kind: str = "auto", vocab_size: int = 30522,
                    lowercase: bool | None = None, model_max_length: int = 512):
    """Train the tokenizer `--model_type`'s family uses (or the `kind` asked for) on `texts` (strings or batches).

    Returns a transformers tokenizer of the family's class, with the family's special tokens.
    """
    from tokenizers import Tokenizer, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    family = family_of(model_type)
    kind, lowercase, class_name = choose(model_type, kind, lowercase)
    specials = family.specials
    ordered = _ordered_specials(specials)
    if class_name != "PreTrainedTokenizerFast":
        # Train with the pipeline the class itself builds, so that loading gives what training saw.
        template = _family_class(family, _minimal_vocab(kind, specials), [], lowercase, model_max_length)
        normalizer = template.backend_tokenizer.normalizer
        pre_tokenizer = template.backend_tokenizer.pre_tokenizer
        decoder = None
    else:
        normalizer, pre_tokenizer, decoder = _generic_pipeline(kind, lowercase)

    if kind == "wordpiece":
        model = models.WordPiece(unk_token=specials["unk_token"])
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=ordered, show_progress=False)
    elif kind == "bpe":
        from tokenizers import pre_tokenizers

        model = models.BPE()  # byte-level: every byte is in the alphabet, so no unknown token is ever needed
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=ordered, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":
        model = models.Unigram()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=ordered, show_progress=False,
                                          unk_token=specials["unk_token"])
    else:
        raise UsageError(f"--tokenizer_type {kind!r}: use one of auto, {', '.join(KINDS)}")
    backend = Tokenizer(model)
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.train_from_iterator(texts, trainer=trainer)
    saved = json.loads(backend.to_str())["model"]

    if class_name != "PreTrainedTokenizerFast":
        vocab = [tuple(piece) for piece in saved["vocab"]] if kind == "unigram" else saved["vocab"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in saved.get("merges", [])]
        return _family_class(family, vocab, merges, lowercase, model_max_length)

    if decoder is not None:
        backend.decoder = decoder
    cls, sep = specials["cls_token"], specials["sep_token"]
    pair = f"{cls} $A {sep} {sep} $B:1 {sep}:1" if cls == "<s>" else f"{cls} $A {sep} $B:1 {sep}:1"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=pair,
        special_tokens=[(token, backend.token_to_id(token)) for token in dict.fromkeys((cls, sep))])
    from tokenizers import AddedToken

    # The mask takes the space before it, as RoBERTa's and ModernBERT's do: "a <mask> b" masks " b"'s word.
    backend.add_special_tokens([AddedToken(specials["mask_token"], lstrip=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length, **specials)


def unknown_rate(tokenizer, texts: list[str]) -> float:
    """The fraction of tokens (special tokens aside) that are the unknown token, over `texts`."""
    if tokenizer.unk_token_id is None or not texts:
        return 0.0
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    # Whole texts on purpose (verbose=False: no "longer than the maximum sequence length" warning).
    ids = [i for row in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] for i in row
           if i not in special]
    return sum(i == tokenizer.unk_token_id for i in ids) / max(len(ids), 1)


def kind_of(tokenizer) -> str | None:
    """wordpiece, bpe or unigram: the model of a fast tokenizer's backend (None for a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return {"WordPiece": "wordpiece", "BPE": "bpe", "Unigram": "unigram"}.get(
        json.loads(backend.to_str())["model"]["type"])
