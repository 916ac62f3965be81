"""Fill-mask predictions from a trained model.

    python -m utils.tools.fill_mask OUTPUT_DIR "The [MASK] of the list is returned." [--top_k 5]

Write the mask as [MASK] or <mask>: it is replaced with the tokenizer's own mask token.
"""

from __future__ import annotations

import argparse
import re
import sys

from utils.errors import UsageError, exit_on_usage_error, one_line

MASK_SPELLINGS = re.compile(r"\[MASK\]|<mask>", flags=re.IGNORECASE)


def check_has_mask(sentence: str, mask_token: str | None = None) -> None:
    """A sentence without [MASK], <mask> (or the tokenizer's own mask token) is an error."""
    if not MASK_SPELLINGS.search(sentence) and (mask_token is None or mask_token not in sentence):
        raise UsageError(f"no mask in {sentence!r}: write [MASK] or <mask> where a word should be predicted")


def adapt_mask_token(sentence: str, mask_token: str) -> str:
    """Rewrite [MASK] / <mask> in `sentence` as `mask_token`; a sentence without a mask is an error."""
    check_has_mask(sentence, mask_token)
    return MASK_SPELLINGS.sub(mask_token, sentence)


def predict_masks(model, tokenizer, sentences: list[str], top_k: int = 5) -> list[list[list[dict]]]:
    """For each sentence, for each mask in it, the top_k predictions as dicts with "token_str" and "score"."""
    from transformers import pipeline

    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=model.device)
    results = []
    for sentence in sentences:
        output = fill(adapt_mask_token(sentence, tokenizer.mask_token), top_k=top_k)
        # The pipeline returns a flat list for one mask and a list per mask for several.
        results.append([output] if output and isinstance(output[0], dict) else output)
    return results


def format_predictions(sentences: list[str], predictions: list[list[list[dict]]]) -> str:
    """Human-readable lines: the sentence, then `token (score)` for each mask."""
    lines = []
    for sentence, per_mask in zip(sentences, predictions):
        lines.append(sentence)
        for i, candidates in enumerate(per_mask, start=1):
            shown = ", ".join(f"{c['token_str'].strip()} ({c['score']:.3f})" for c in candidates)
            label = f"  mask {i}: " if len(per_mask) > 1 else "  -> "
            lines.append(label + shown)
    return "\n".join(lines)


@exit_on_usage_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a run's output directory (or any MLM checkpoint)")
    parser.add_argument("sentences", nargs="*", help="sentences with [MASK] or <mask>")
    parser.add_argument("--file", help="a text file with one sentence per line")
    parser.add_argument("--top_k", type=int, default=5, help="predictions per mask (default 5)")
    args = parser.parse_args(argv)

    sentences = list(args.sentences)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            sentences += [line.strip() for line in f if line.strip()]
    if not sentences:
        raise UsageError("give at least one sentence with [MASK], or --file")
    for sentence in sentences:  # before loading anything
        check_has_mask(sentence)

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForMaskedLM.from_pretrained(args.model_dir)
    except OSError as e:
        raise UsageError(f"{args.model_dir}: cannot load a model and tokenizer ({one_line(e)})") from e
    predictions = predict_masks(model, tokenizer, sentences, args.top_k)
    print(format_predictions(sentences, predictions))


if __name__ == "__main__":
    sys.exit(main())
