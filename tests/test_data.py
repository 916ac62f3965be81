"""Loading local files in every supported format, choosing the text column, tokenizing and grouping."""

import gzip
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from utils.data.pipeline import (
    BlockPacker,
    check_extension,
    find_text_column,
    load_raw_datasets,
    preprocess_datasets,
    resolve_data_files,
    split_off_validation,
)
from utils.data.tokenizer import train_wordpiece_tokenizer
from utils.errors import UsageError

LINES = [f"sentence number {i} is about the weather today ." for i in range(40)]


def data_args(**overrides):
    values = dict(dataset_name=None, dataset_config_name=None, train_file=None, validation_file=None,
                  streaming=False, validation_split_percentage=5, text_column_name=None, whole_word_mask=False,
                  line_by_line=False, pad_to_max_length=False, preprocessing_num_workers=None,
                  overwrite_cache=False)
    values.update(overrides)
    return SimpleNamespace(**values)


MODEL_ARGS = SimpleNamespace(cache_dir=None, token=None)


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer(LINES * 3, vocab_size=80, model_max_length=64)


def test_the_packer_concatenates_numpy_sequences_in_order_and_cuts_blocks():
    packer = BlockPacker(4)
    blocks = [packer.add({"input_ids": np.array(ids, dtype=np.uint16)})["input_ids"]
              for ids in ([1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12, 13])]
    assert [b.tolist() for b in blocks] == [[], [[1, 2, 3, 4]], [[5, 6, 7, 8], [9, 10, 11, 12]]]
    assert blocks[2].dtype == np.uint16 and packer.tokens_left == 1


def test_the_packer_cuts_every_column_at_the_same_places():
    packer = BlockPacker(3)
    blocks = packer.add({"input_ids": np.array([1, 2, 3, 4, 5, 6, 7]),
                         "offsets": np.array([[0, 0], [0, 3], [0, 0], [0, 0], [0, 2], [3, 5], [0, 0]])})
    assert blocks["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert blocks["offsets"].shape == (2, 3, 2) and blocks["offsets"][1].tolist() == [[0, 0], [0, 2], [3, 5]]
    assert packer.carry["offsets"].tolist() == [[0, 0]]


def test_text_shorter_than_a_block_gives_no_block_and_is_carried():
    packer = BlockPacker(4)
    assert len(packer.add({"input_ids": np.array([1, 2])})["input_ids"]) == 0
    assert packer.add({"input_ids": np.array([3, 4, 5])})["input_ids"].tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize("name, builder", [("a.txt", "text"), ("a.TXT", "text"), ("a.jsonl", "json"),
                                           ("a.json", "json"), ("a.csv", "csv"), ("a.parquet", "parquet"),
                                           ("a.txt.gz", "text"), ("dir.v2/a.csv.zst", "csv")])
def test_extensions(name, builder):
    assert check_extension(name, "train_file") == builder


@pytest.mark.parametrize("name", ["a.docx", "a", "a.gz", "a.tsv"])
def test_unsupported_extension_names_the_flag_and_the_choices(name):
    with pytest.raises(UsageError, match=r"--validation_file .*unsupported extension.*\.txt, .*\.parquet"):
        check_extension(name, "validation_file")


def test_resolve_globs_missing_and_empty_files(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text("hello world\n")
    builder, files = resolve_data_files([str(tmp_path / "part*.txt")], "train_file")
    assert builder == "text" and [f.rsplit("/", 1)[1] for f in files] == ["part0.txt", "part1.txt", "part2.txt"]
    with pytest.raises(UsageError, match=r"--train_file .*nothing\*.txt matches no file"):
        resolve_data_files([str(tmp_path / "nothing*.txt")], "train_file")
    with pytest.raises(UsageError, match=r"--train_file .*absent.txt does not exist"):
        resolve_data_files([str(tmp_path / "absent.txt")], "train_file")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match=r"empty.txt is empty"):
        resolve_data_files([str(tmp_path / "empty.txt")], "train_file")
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(UsageError, match="mixes file formats"):
        resolve_data_files([str(tmp_path / "part0.txt"), str(tmp_path / "x.csv")], "train_file")


def write_all_formats(directory):
    """The same 40 texts as txt, txt.gz, csv, json (list), jsonl and parquet, with an extra column."""
    frame = pd.DataFrame({"id": range(len(LINES)), "body": LINES})
    paths = {
        "txt": directory / "c.txt",
        "txt.gz": directory / "c.txt.gz",
        "csv": directory / "c.csv",
        "jsonl": directory / "c.jsonl",
        "json": directory / "c.json",
        "parquet": directory / "c.parquet",
    }
    paths["txt"].write_text("\n".join(LINES) + "\n")
    with gzip.open(paths["txt.gz"], "wt") as f:
        f.write("\n".join(LINES) + "\n")
    frame.to_csv(paths["csv"], index=False)
    frame.to_json(paths["jsonl"], orient="records", lines=True)
    paths["json"].write_text(json.dumps(frame.to_dict(orient="records")))
    frame.to_parquet(paths["parquet"])
    return paths


@pytest.mark.parametrize("fmt", ["txt", "txt.gz", "csv", "jsonl", "json", "parquet"])
def test_every_format_loads_the_same_texts(tmp_path, fmt):
    path = write_all_formats(tmp_path)[fmt]
    raw = load_raw_datasets(data_args(train_file=[str(path)], validation_split_percentage=10), MODEL_ARGS)
    train, validation = raw["train"], raw["validation"]
    column = find_text_column(train.column_names, train.features, None)
    assert column == ("text" if fmt.startswith("txt") else "body")  # the only string column
    # The validation split is the head of the file, the rest is training text, order kept.
    assert list(validation[column]) + list(train[column]) == LINES
    assert len(validation) == 4


def test_text_column_errors_list_the_columns(tmp_path):
    frame = pd.DataFrame({"title": ["a", "b"], "abstract": ["c", "d"], "n": [1, 2]})
    expected = r"2 string columns in \['title', 'abstract', 'n'\]; name the column with --text_column_name"
    with pytest.raises(UsageError, match=expected):
        from datasets import Dataset

        ds = Dataset.from_pandas(frame)
        find_text_column(ds.column_names, ds.features, None)
    with pytest.raises(UsageError, match=r"--text_column_name 'body' is not a column; the columns are \['title'"):
        find_text_column(list(frame.columns), {}, "body")
    assert find_text_column(list(frame.columns), {}, "abstract") == "abstract"


def test_separate_validation_file_of_another_format(tmp_path):
    paths = write_all_formats(tmp_path)
    raw = load_raw_datasets(data_args(train_file=[str(paths["txt"])], validation_file=[str(paths["csv"])]),
                            MODEL_ARGS)
    assert len(raw["train"]) == len(raw["validation"]) == len(LINES)


def test_split_off_validation_refuses_to_leave_no_training_rows():
    from datasets import Dataset

    validation, train = split_off_validation(Dataset.from_dict({"text": ["a", "b", "c", "d"]}), 50)
    assert list(validation["text"]) == ["a", "b"] and list(train["text"]) == ["c", "d"]
    with pytest.raises(UsageError, match="--validation_split_percentage 5 leaves no training text"):
        split_off_validation(Dataset.from_dict({"text": ["a"]}), 5)


def test_dataset_name_loads_a_local_dataset_directory(tmp_path):
    # `load_dataset(name)` is the hub code path; offline, a local directory exercises it.
    directory = tmp_path / "my_dataset"
    directory.mkdir()
    (directory / "train.txt").write_text("\n".join(LINES[:30]) + "\n")
    (directory / "validation.txt").write_text("\n".join(LINES[30:]) + "\n")
    raw = load_raw_datasets(data_args(dataset_name=str(directory)), MODEL_ARGS)
    assert list(raw["train"]["text"]) == LINES[:30]
    assert list(raw["validation"]["text"]) == LINES[30:]


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(UsageError, match=r"--dataset_name someone/absent-corpus: cannot load the dataset \(offline"):
        load_raw_datasets(data_args(dataset_name="someone/absent-corpus"), MODEL_ARGS)


def test_preprocess_packs_fixed_blocks_without_padding(tmp_path, tokenizer):
    path = write_all_formats(tmp_path)["txt"]
    args = data_args(train_file=[str(path)], validation_split_percentage=25)
    raw = load_raw_datasets(args, MODEL_ARGS)
    blocks = preprocess_datasets(raw, tokenizer, args, 16)
    assert blocks["train"].column_names == ["input_ids"]
    ids = np.array(list(blocks["train"]["input_ids"]))
    assert ids.shape[1] == 16 and len(ids) > 5
    assert tokenizer.pad_token_id not in ids
    # Every text keeps its [CLS] ... [SEP]: as many of each as texts, minus the dropped tail.
    n_cls = (ids == tokenizer.cls_token_id).sum()
    assert len(raw["train"]) - 3 <= n_cls <= len(raw["train"])
    assert blocks["train"][0]["input_ids"][0] == tokenizer.cls_token_id


def test_line_by_line_keeps_one_example_per_non_blank_line(tmp_path, tokenizer):
    path = tmp_path / "lines.txt"
    path.write_text("short line\n\n   \n" + " ".join(["long"] * 100) + "\n")
    args = data_args(train_file=[str(path)], validation_split_percentage=0, line_by_line=True)
    raw = load_raw_datasets(args, MODEL_ARGS)
    examples = preprocess_datasets(raw, tokenizer, args, 16)["train"]
    lengths = [len(ids) for ids in examples["input_ids"]]
    short = len(tokenizer("short line")["input_ids"])
    assert 4 <= short < 16
    assert lengths == [short, 16]  # blank lines skipped; the long line truncated to 16
    args.pad_to_max_length = True
    padded = preprocess_datasets(raw, tokenizer, args, 16)["train"]
    assert [len(ids) for ids in padded["input_ids"]] == [16, 16]
    assert padded[0]["attention_mask"] == [1] * short + [0] * (16 - short)


def test_corpus_shorter_than_one_block_is_a_clear_error(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words\n")
    args = data_args(train_file=[str(path)], validation_split_percentage=0)
    raw = load_raw_datasets(args, MODEL_ARGS)
    with pytest.raises(UsageError, match=r"fewer tokens than one block of 64 \(--max_seq_length\)"):
        preprocess_datasets(raw, tokenizer, args, 64)


def test_two_preprocessing_workers_give_full_blocks(tmp_path, tokenizer):
    path = tmp_path / "many.txt"
    path.write_text("\n".join(LINES * 20) + "\n")
    args = data_args(train_file=[str(path)], validation_split_percentage=0)
    raw = load_raw_datasets(args, MODEL_ARGS)
    one = preprocess_datasets(raw, tokenizer, args, 16)["train"]
    args.preprocessing_num_workers = 2
    two = preprocess_datasets(raw, tokenizer, args, 16)["train"]
    # Packing is one pass over all workers' output: the same blocks as one worker, no tokens lost per shard.
    assert list(two["input_ids"]) == list(one["input_ids"])


def test_tokenization_is_cached_across_tokenizer_instances(tmp_path, tokenizer):
    # The cache key hashes the tokenizer; two loads of the same tokenizer must hit the same
    # cache, or every run and every rank would tokenize again.
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    path = write_all_formats(tmp_path)["txt"]
    args = data_args(train_file=[str(path)], validation_split_percentage=0)
    raw = load_raw_datasets(args, MODEL_ARGS)
    first = preprocess_datasets(raw, AutoTokenizer.from_pretrained(tmp_path / "tok"), args, 16)
    second = preprocess_datasets(raw, AutoTokenizer.from_pretrained(tmp_path / "tok"), args, 16)
    assert first["train"].cache_files and first["train"].cache_files == second["train"].cache_files
    args.overwrite_cache = True
    third = preprocess_datasets(raw, AutoTokenizer.from_pretrained(tmp_path / "tok"), args, 16)
    assert list(third["train"]["input_ids"]) == list(first["train"]["input_ids"])
