"""The masking collator: which tokens are masked, how, and the fixed masks of the evaluation set."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset

from utils.data.masking import build_collator, mask_eval_dataset
from utils.data.tokenizer import train_wordpiece_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda".split()


def train_word_tokenizer(model_max_length: int = 64):
    """A WordPiece tokenizer of about 150 tokens trained on random sentences of WORDS."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=12)) for _ in range(200)]
    return train_wordpiece_tokenizer(texts, vocab_size=150, model_max_length=model_max_length)


@pytest.fixture(scope="module")
def tokenizer():
    return train_word_tokenizer()


def data_args(**overrides):
    values = dict(mlm_probability=0.15, mask_replace_prob=0.8, random_replace_prob=0.1, whole_word_mask=False,
                  pad_to_multiple_of=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def run_args(**values):
    """The training arguments the collator reads: seed, accumulation, and the process layout (one CPU process)."""
    layout = dict(process_index=0, local_process_index=0, world_size=1, gradient_accumulation_steps=1,
                  device=torch.device("cpu"))
    return SimpleNamespace(**{**layout, **values})


def blocks(tokenizer, n_rows=400, length=32, seed=0):
    """Rows shaped like packed blocks: [CLS] words [SEP] [CLS] words [SEP] ..."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        ids = []
        while len(ids) < length:
            ids += tokenizer(" ".join(rng.choice(WORDS, size=6)))["input_ids"]
        rows.append({"input_ids": ids[:length]})
    return rows


def test_special_tokens_are_never_masked_and_labels_are_set_only_where_masked(tokenizer):
    torch.manual_seed(0)
    rows = blocks(tokenizer)
    original = torch.tensor([r["input_ids"] for r in rows])
    batch = build_collator(tokenizer, data_args(mlm_probability=0.5))(rows)
    labels, inputs = batch["labels"], batch["input_ids"]
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert special.sum() > 0
    # No special token carries a label, and special tokens are left as they were.
    assert (labels[special] == -100).all()
    assert (inputs[special] == original[special]).all()
    # Labels hold the original token where set, -100 elsewhere; unlabelled tokens are untouched.
    labelled = labels != -100
    assert (labels[labelled] == original[labelled]).all()
    assert (inputs[~labelled] == original[~labelled]).all()


def test_masking_rate_and_80_10_10_split(tokenizer):
    torch.manual_seed(1)
    rows = blocks(tokenizer, n_rows=2000)
    original = torch.tensor([r["input_ids"] for r in rows])
    batch = build_collator(tokenizer, data_args())(rows)
    labelled = batch["labels"] != -100
    maskable = ~torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    rate = labelled.sum().item() / maskable.sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    chosen_inputs = batch["input_ids"][labelled]
    chosen_original = original[labelled]
    as_mask = (chosen_inputs == tokenizer.mask_token_id).float().mean().item()
    unchanged = (chosen_inputs == chosen_original).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.02)
    # 10% are kept; a random replacement occasionally draws the original token too.
    assert unchanged == pytest.approx(0.1, abs=0.02)


def test_replacement_probabilities_are_honoured(tokenizer):
    torch.manual_seed(2)
    rows = blocks(tokenizer, n_rows=500)
    batch = build_collator(tokenizer, data_args(mask_replace_prob=1.0, random_replace_prob=0.0))(rows)
    labelled = batch["labels"] != -100
    assert (batch["input_ids"][labelled] == tokenizer.mask_token_id).all()


def word_rows(tokenizer, text, n_rows):
    from utils.data.pipeline import word_starts_of

    encoded = tokenizer(text)
    return [{"input_ids": encoded["input_ids"], "word_starts": word_starts_of(encoded.word_ids())}] * n_rows, \
        np.array([-1 if w is None else w for w in encoded.word_ids()])


def assert_whole_words(labelled, word_ids):
    for row in labelled:
        for word in set(word_ids[word_ids >= 0]):
            in_word = row[word_ids == word]
            assert in_word.all() or not in_word.any(), "a word was partly masked"


def test_whole_word_mask_masks_all_pieces_of_a_word(tokenizer):
    torch.manual_seed(3)
    # Glued words the tokenizer never saw split into known pieces (alpha ##beta).
    rows, word_ids = word_rows(tokenizer, "alphabeta gammazeta alpha thetaiota beta", 400)
    assert len(word_ids) > 7 and len(set(word_ids[word_ids >= 0])) == 5  # unknown words split into pieces
    collator = build_collator(tokenizer, data_args(whole_word_mask=True, mlm_probability=0.3))
    batch = collator(rows)
    labelled = (batch["labels"] != -100).numpy()
    assert_whole_words(labelled, word_ids)
    # Words, not tokens, are selected with the probability: about 30% of the words per row that
    # can be (one is a single [UNK], a special token, never selected).
    special = set(tokenizer.all_special_ids)
    selectable = {w for w, i in zip(word_ids, rows[0]["input_ids"]) if w >= 0 and i not in special}
    assert len(selectable) == 4
    selected_words = [len({w for w in word_ids[row] if w >= 0}) for row in labelled]
    assert np.mean(selected_words) == pytest.approx(0.3 * len(selectable), abs=0.1)
    # A selected word is masked, replaced or kept whole: 80/10/10 per word.
    first_pieces = np.array([i for i, w in enumerate(word_ids) if w >= 0 and (i == 0 or word_ids[i - 1] != w)])
    chosen = labelled[:, first_pieces]
    as_mask = (batch["input_ids"].numpy()[:, first_pieces] == tokenizer.mask_token_id)[chosen].mean()
    assert as_mask == pytest.approx(0.8, abs=0.05)
    assert "word_starts" not in batch  # not a model input


def test_whole_word_masks_by_step_and_a_word_cut_by_the_block_start(tokenizer):
    rows, word_ids = word_rows(tokenizer, "alphabeta gammazeta alpha thetaiota beta", 64)
    # Cut the rows inside the first word: the block starts with a word's continuation piece.
    rows = [{"input_ids": r["input_ids"][2:], "word_starts": [0, *r["word_starts"][3:]]} for r in rows]
    word_ids = word_ids[2:]
    collator = build_collator(tokenizer, data_args(whole_word_mask=True, mlm_probability=0.5),
                              run_args(seed=3))
    batch = collator.mask_batch(collator(rows), step=7)
    labelled = (batch["labels"] != -100).numpy()
    assert_whole_words(labelled, word_ids)  # the cut word's remaining pieces form one word
    again = collator.mask_batch(collator(rows), step=7)
    assert torch.equal(batch["labels"], again["labels"])  # keyed by the step, like token masks


def test_evaluation_set_is_masked_once_and_identically(tokenizer):
    dataset = Dataset.from_list(blocks(tokenizer, n_rows=50))
    collator = build_collator(tokenizer, data_args())
    first = mask_eval_dataset(dataset, collator, seed=7)
    second = mask_eval_dataset(dataset, collator, seed=7)
    other_seed = mask_eval_dataset(dataset, collator, seed=8)
    assert list(first["labels"]) == list(second["labels"])
    assert list(first["labels"]) != list(other_seed["labels"])
    # The collator passes pre-masked rows through without masking them again.
    rows = [first[i] for i in range(8)]
    batch = collator(rows)
    assert batch["labels"].tolist() == [r["labels"] for r in rows]
    assert batch["input_ids"].tolist() == [r["input_ids"] for r in rows]


def test_premasked_rows_of_unequal_length_are_padded_with_ignored_labels(tokenizer):
    rows = [{"input_ids": [2, 10, 11, 3], "labels": [-100, 10, -100, -100]},
            {"input_ids": [2, 12, 3], "labels": [-100, -100, -100]}]
    batch = build_collator(tokenizer, data_args(pad_to_multiple_of=8))(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1].tolist() == [-100] * 8
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 5


def seeded(tokenizer, **layout):
    args = run_args(seed=11, process_index=layout.get("rank", 0), world_size=layout.get("world_size", 1),
                    gradient_accumulation_steps=layout.get("accumulation_steps", 1), dataloader_num_workers=0)
    return build_collator(tokenizer, data_args(), args)


def masked(collator, rows, step, micro=0):
    """What MLMTrainer does with a batch: collate (pad), then mask as micro-batch `micro` of `step`."""
    return collator.mask_batch(collator(rows), step, micro)


def test_seeded_masks_keep_the_rate_and_the_80_10_10_split(tokenizer):
    rows = blocks(tokenizer, n_rows=2000)
    original = torch.tensor([r["input_ids"] for r in rows])
    batch = masked(seeded(tokenizer), rows, step=0)
    labelled = batch["labels"] != -100
    maskable = ~torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert (labelled & ~maskable).sum() == 0
    assert labelled.sum().item() / maskable.sum().item() == pytest.approx(0.15, abs=0.01)
    assert (batch["labels"][labelled] == original[labelled]).all()
    chosen = batch["input_ids"][labelled]
    assert (chosen == tokenizer.mask_token_id).float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert (chosen == original[labelled]).float().mean().item() == pytest.approx(0.1, abs=0.02)


def test_masks_are_the_same_on_one_or_two_processes_and_with_accumulation(tokenizer):
    rows = blocks(tokenizer, n_rows=16)
    whole = seeded(tokenizer)
    steps = [masked(whole, rows, 0), masked(whole, rows, 1)]  # two optimizer steps of 16 rows on one process
    # Two processes of 8 rows each: rank r holds rows [8r, 8r + 8) of the global batch.
    for rank in (0, 1):
        part = seeded(tokenizer, rank=rank, world_size=2)
        for step, expected in enumerate(steps):
            got = masked(part, rows[8 * rank: 8 * rank + 8], step)
            assert torch.equal(got["labels"], expected["labels"][8 * rank: 8 * rank + 8])
            assert torch.equal(got["input_ids"], expected["input_ids"][8 * rank: 8 * rank + 8])
    # One process, two accumulation steps of 8 rows: micro-batch m holds rows [8m, 8m + 8).
    accumulating = seeded(tokenizer, accumulation_steps=2)
    for step, expected in enumerate(steps):
        for micro in (0, 1):
            got = masked(accumulating, rows[8 * micro: 8 * micro + 8], step, micro)
            assert torch.equal(got["labels"], expected["labels"][8 * micro: 8 * micro + 8])
    # Two processes with two accumulation steps each: 4 rows per micro-batch.
    for rank in (0, 1):
        both = seeded(tokenizer, rank=rank, world_size=2, accumulation_steps=2)
        for step, expected in enumerate(steps):
            for micro in (0, 1):
                first = (micro * 2 + rank) * 4
                got = masked(both, rows[first: first + 4], step, micro)
                assert torch.equal(got["labels"], expected["labels"][first: first + 4])


def test_masks_depend_on_the_step_not_on_how_many_batches_came_before(tokenizer):
    rows = blocks(tokenizer, n_rows=8)
    collator = seeded(tokenizer)
    unmasked = collator(rows)
    assert "labels" not in unmasked  # the collator only pads; the Trainer masks by step
    assert unmasked["input_ids"].tolist() == [r["input_ids"] for r in rows]
    sequence = [masked(collator, rows, step)["labels"] for step in range(3)]
    assert torch.equal(masked(seeded(tokenizer), rows, 2)["labels"], sequence[2])  # a fresh collator, as on resume
    assert not torch.equal(sequence[0], sequence[1])  # each step draws new masks


# --- the cap of predictions per block (--max_predictions_per_seq; the XLA head's slots) ------------------

def test_capped_masks_keep_at_most_the_cap_per_row_a_subset_of_the_uncapped_draw(tokenizer):
    rows = blocks(tokenizer, n_rows=200)
    free = build_collator(tokenizer, data_args(mlm_probability=0.4))
    capped = build_collator(tokenizer, data_args(mlm_probability=0.4), max_predictions=8)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ids = free._pad(rows)["input_ids"]
    _, free_labels = free.mask_rows(ids, generator())
    masked, labels = capped.mask_rows(ids, generator())
    kept, drawn = labels != -100, free_labels != -100
    assert (drawn.sum(1) > 8).sum() > 50  # the cap binds on many rows at 40% of 32 tokens
    assert kept.sum(1).max() == 8 and torch.equal(kept.sum(1), drawn.sum(1).clamp(max=8))
    assert not (kept & ~drawn).any()  # only tokens of the same draw are kept
    assert torch.equal(masked[~kept], ids[~kept])  # dropped selections stay unmasked
    # Which are kept is random, not the first ones of the row: later positions are kept too.
    over = drawn.sum(1) > 8
    last_drawn = (drawn[over] * torch.arange(32)).argmax(1)
    assert kept[over].gather(1, last_drawn[:, None]).float().mean() > 0.2
    dropped, total = int((drawn.sum(1) - 8).clamp(min=0).sum()), int(drawn.sum())
    assert capped.cap_report("train") == (
        f"{dropped:,} of {total:,} selected tokens ({dropped / total:.3%}) went over the cap of 8 "
        "predictions per block (--max_predictions_per_seq) and were left unmasked")
    assert free.cap_report("train") is None


def test_default_slots_cover_nearly_every_block():
    from utils.data.masking import default_max_predictions

    assert default_max_predictions(128, 0.15) == 32  # BERT's 20 would cap about 4 blocks in 10
    assert default_max_predictions(512, 0.15) == 104
    assert default_max_predictions(32, 0.15) == 16
    assert default_max_predictions(16, 0.9) == 16  # never more slots than tokens
    over = sum(torch.distributions.Binomial(128, torch.tensor(0.15)).sample((20000,)) > 32)
    assert over / 20000 < 0.003


def test_evaluation_masks_are_capped_too(tokenizer):
    rows = blocks(tokenizer, n_rows=64)
    collator = build_collator(tokenizer, data_args(mlm_probability=0.5), max_predictions=4)
    masked = mask_eval_dataset(Dataset.from_list(rows), collator, seed=0)
    assert max(sum(label != -100 for label in row) for row in masked["labels"]) == 4
    assert collator.cap_report("eval").endswith("cap of 4 predictions per block (--max_predictions_per_seq) and "
                                                "were left unmasked")
