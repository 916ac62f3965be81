"""Token ids exactly as `tokenizer(text)` gives them, whatever padding or truncation the tokenizer carries.

A fast tokenizer's Rust backend keeps the padding and truncation saved in its tokenizer.json
(sentence-transformers saves `"padding": {"strategy": {"Fixed": 128}}` and truncation at
128) and applies them in `encode_batch*`. The Python wrapper resets both on every call from
its own arguments, so `tokenizer(text)` is unaffected, but the backend's state depends on
which wrapper call ran last. The data pipeline calls the backend directly for speed, so it
encodes with a copy whose backend neither pads nor truncates: the user's tokenizer object is
left as it is, and what the model trains on is the text's own ids.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np

from utils.errors import UsageError


def own_padding(tokenizer) -> str | None:
    """What the tokenizer's backend does to every text on its own (pads, truncates), in a phrase; None if nothing."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None
    what = []
    padding = backend.padding
    if padding is not None:
        length = padding.get("length")
        what.append(f"pads every text to {length} tokens" if length else "pads every batch to its longest text")
    truncation = backend.truncation
    if truncation is not None:
        what.append(f"truncates every text at {truncation['max_length']} tokens")
    return " and ".join(what) or None


def is_exact(tokenizer) -> bool:
    """Whether encoding with the backend gives what `tokenizer(text)` gives (no own padding or truncation)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend is None or (backend.padding is None and backend.truncation is None
                               and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens",
                                                                                 False)))


def exact_copy(tokenizer):
    """A copy of `tokenizer` whose backend encodes each text as `tokenizer(text)` does: no padding, no truncation.

    Also used for the wrapper calls of the data pipeline (offsets, line_by_line), which set
    the backend's state per call: on a copy, they leave the caller's tokenizer untouched.
    """
    exact = copy.deepcopy(tokenizer)
    backend = getattr(exact, "_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
        # The wrapper sets this per call from the tokenizer's own setting; so does the copy.
        backend.encode_special_tokens = bool(getattr(exact, "split_special_tokens", False))
    return exact


def encode_to_arrays(texts: list[str], tokenizer, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` (with special tokens) as one flat array, and each text's offset into it.

    `tokenizer` must be exact (see `exact_copy`). Fast tokenizers go straight to the Rust
    backend's `encode_batch_fast` (no offsets, no Python-side BatchEncoding): this is most of
    the raw tokenizer's speed. Slow (Python) tokenizers go through their own `__call__`.
    """
    backend = _exact_backend(tokenizer)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        sequences = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
    else:
        sequences = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False,
                              verbose=False)["input_ids"]
    ids, offsets = _flatten(sequences, dtype)
    check_no_padding(ids, texts, tokenizer)
    return ids, offsets


def encode_with_word_starts(texts: list[str], tokenizer, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As `encode_to_arrays` (fast tokenizers only), plus 1 (uint8) where a token begins a word, 0 inside one."""
    # encode_batch, not encode_batch_fast: word ids come with the offsets it tracks.
    encodings = _exact_backend(tokenizer).encode_batch(texts, add_special_tokens=True)
    ids, offsets = _flatten([e.ids for e in encodings], dtype)
    check_no_padding(ids, texts, tokenizer)
    starts = np.fromiter((s for e in encodings for s in word_starts_of(e.word_ids)), dtype=np.uint8, count=len(ids))
    return ids, offsets, starts


def word_starts_of(word_ids: list[int | None]) -> list[int]:
    """1 where a token begins a word (the tokenizer's pre-tokenized word), 0 inside one; specials are 1."""
    return [int(word is None or i == 0 or word != word_ids[i - 1]) for i, word in enumerate(word_ids)]


def _exact_backend(tokenizer):
    """The fast tokenizer's backend (None for a slow one), refused if it pads, truncates or splits specials itself."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not is_exact(tokenizer):
        raise ValueError(f"the tokenizer {own_padding(tokenizer) or 'splits special tokens unlike its wrapper'}:"
                         " encode with utils.data.encoding.exact_copy(tokenizer)")
    return backend


def _flatten(sequences: list[list[int]], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The sequences as one flat array of `dtype`, and each one's offset into it (len + 1 offsets)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(itertools.chain.from_iterable(sequences), dtype=dtype, count=int(offsets[-1]))
    return ids, offsets


def check_no_padding(ids: np.ndarray, texts: list[str], tokenizer) -> None:
    """Refuse ids that hold more pad tokens than the texts spell out: padding must never be trained on.

    One vectorised count per batch; the texts are searched only when a pad id turns up.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        return
    found = int(np.count_nonzero(ids == pad_id))
    if found == 0:
        return
    spelled = sum(text.count(tokenizer.pad_token) for text in texts)
    if found > spelled:
        raise UsageError(
            f"tokenizing {len(texts)} texts gave {found} pad tokens ({tokenizer.pad_token!r}, id {pad_id}) where the "
            f"text spells {spelled}: the tokenizer pads on its own (its post-processor or model adds "
            f"{tokenizer.pad_token!r}); fix its tokenizer.json, or pass another --tokenizer_name"
        )
