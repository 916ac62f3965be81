"""Argument parsing: args files, overrides, and checks that name the flag."""

import json
import subprocess
import sys

import pytest
from transformers import HfArgumentParser

from run_mlm import (
    ARGUMENT_GROUPS,
    DataTrainingArguments,
    DownstreamCheckArguments,
    ModelArguments,
    check_run_arguments,
)
from utils.args import parse_args
from utils.errors import UsageError

from .conftest import REPO


def parse(argv):
    """run_mlm's parsing: (model, data, training) arguments (the downstream check's are left out)."""
    model_args, data_args, _, training_args = parse_args(HfArgumentParser(ARGUMENT_GROUPS), argv)
    return model_args, data_args, training_args


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


BASE_YAML = """
model_type: bert
train_file: {train}
max_seq_length: 64
learning_rate: 1e-3          # YAML reads this as a string; argparse converts it
output_dir: {out}
do_train: true
report_to: [tensorboard]
fill_mask_sentences:
  - "a [MASK] b"
"""


def test_yaml_file_sets_fields_of_all_three_groups(tmp_path, corpus):
    path = write(tmp_path / "a.yaml", BASE_YAML.format(train=corpus, out=tmp_path / "o"))
    model_args, data_args, training_args = parse([path])
    assert model_args.model_type == "bert"
    assert data_args.train_file == [str(corpus)]  # a single path becomes a list
    assert data_args.max_seq_length == 64
    assert data_args.fill_mask_sentences == ["a [MASK] b"]
    assert training_args.learning_rate == pytest.approx(1e-3)
    assert training_args.do_train is True
    assert training_args.report_to == ["tensorboard"]


def test_flags_after_the_file_override_it(tmp_path, corpus):
    path = write(tmp_path / "a.yaml", BASE_YAML.format(train=corpus, out=tmp_path / "o"))
    _, data_args, training_args = parse([path, "--max_seq_length", "32", "--learning_rate", "5e-4",
                                         "--output_dir", str(tmp_path / "p")])
    assert data_args.max_seq_length == 32
    assert training_args.learning_rate == pytest.approx(5e-4)
    assert training_args.output_dir == str(tmp_path / "p")


def test_json_file(tmp_path, corpus):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"model_type": "roberta", "train_file": [str(corpus)], "mlm_probability": 0.3,
                                "output_dir": str(tmp_path / "o")}))
    model_args, data_args, _ = parse([str(path)])
    assert model_args.model_type == "roberta"
    assert data_args.mlm_probability == 0.3


def test_flags_alone_without_a_file(corpus, tmp_path):
    model_args, data_args, _ = parse(["--model_type", "bert", "--train_file", str(corpus), str(corpus),
                                      "--output_dir", str(tmp_path)])
    assert data_args.train_file == [str(corpus), str(corpus)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_type: bert\nlearning_rat: 0.1\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ("model_type: bert\n  bad: [indent\n", "is not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
    ],
)
def test_bad_yaml_files_name_the_problem(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(UsageError, match=None) as info:
        parse([path])
    assert message in str(info.value)
    assert path in str(info.value)


def test_malformed_json_gives_line_and_column(tmp_path):
    path = write(tmp_path / "bad.json", '{"model_type": "bert",\n "max_seq_length": }')
    with pytest.raises(UsageError, match=r"not valid JSON: .* line 2, column 20"):
        parse([path])


def test_missing_args_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        parse([str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "flags, flag_named",
    [
        (["--model_name_or_path", "x", "--config_overrides", "hidden_size=8"], "--config_overrides"),
        (["--model_type", "gpt2"], "--model_type"),
        ([], "--model_name_or_path"),
        (["--model_type", "bert", "--mlm_probability", "0"], "--mlm_probability"),
        (["--model_type", "bert", "--mlm_probability", "1.5"], "--mlm_probability"),
        (["--model_type", "bert", "--mask_replace_prob", "0.9", "--random_replace_prob", "0.2"],
         "--random_replace_prob"),
        (["--model_type", "bert", "--pad_to_max_length"], "--pad_to_max_length"),
        (["--model_type", "bert", "--validation_split_percentage", "100"], "--validation_split_percentage"),
        (["--model_type", "bert", "--dataset_name", "wikitext"], "--dataset_name and --train_file"),
        (["--model_type", "bert", "--tokenizer_vocab_size", "10"], "--tokenizer_vocab_size"),
        (["--model_type", "bert", "--max_predictions_per_seq", "0"], "--max_predictions_per_seq"),
    ],
)
def test_contradictory_or_invalid_flags_name_the_flag(corpus, tmp_path, flags, flag_named):
    with pytest.raises(UsageError) as info:
        parse(["--train_file", str(corpus), "--output_dir", str(tmp_path), *flags])
    assert flag_named in str(info.value)


def test_no_data_and_wrong_extension(tmp_path):
    with pytest.raises(UsageError, match="no data given"):
        parse(["--model_type", "bert", "--output_dir", str(tmp_path)])
    with pytest.raises(UsageError, match=r"--train_file .*corpus\.docx: unsupported extension \.docx"):
        parse(["--model_type", "bert", "--train_file", str(tmp_path / "corpus.docx")])


def test_nothing_to_do_is_an_error(corpus, tmp_path):
    args = parse(["--model_type", "bert", "--train_file", str(corpus), "--output_dir", str(tmp_path)])
    with pytest.raises(UsageError, match="--do_train and/or --do_eval"):
        check_run_arguments(*args)


def test_token_is_kept_out_of_the_printed_arguments(corpus, tmp_path):
    model_args, _, _ = parse(["--model_type", "bert", "--train_file", str(corpus), "--token", "hf_SECRET123",
                              "--output_dir", str(tmp_path)])
    assert model_args.token == "hf_SECRET123"
    assert "hf_SECRET123" not in repr(model_args)


def test_command_line_error_is_one_line_without_traceback(tmp_path, corpus):
    result = subprocess.run(
        [sys.executable, "run_mlm.py", "--model_type", "bert", "--train_file", str(corpus),
         "--mlm_probability", "2", "--do_train", "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --mlm_probability 2.0 must be between 0 and 1 (exclusive); 0.15 is BERT's, 0.3 suits large models"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("group", [ModelArguments, DataTrainingArguments, DownstreamCheckArguments])
def test_every_argument_is_documented_in_help_and_readme(group):
    import dataclasses

    readme = (REPO / "README.md").read_text()
    for f in dataclasses.fields(group):
        assert len(f.metadata.get("help", "")) > 15, f"{f.name} has no help text"
        assert f"| `{f.name}` |" in readme, f"{f.name} is missing from the README's argument table"


def test_transformers_own_checks_become_one_line(corpus, tmp_path):
    with pytest.raises(UsageError, match=r"load_best_model_at_end requires the save and eval strategy to match"):
        parse(["--model_type", "bert", "--train_file", str(corpus), "--output_dir", str(tmp_path),
               "--load_best_model_at_end", "--eval_strategy", "steps", "--save_strategy", "epoch"])


def test_a_list_for_a_single_valued_key_names_the_key(tmp_path, corpus):
    path = write(tmp_path / "a.yaml", f"model_type: bert\ntrain_file: {corpus}\nmax_seq_length: [64, 128]\n")
    with pytest.raises(UsageError, match=r"args file .*a\.yaml: max_seq_length takes one value, not a list"):
        parse([path])


def test_a_bug_in_a_check_keeps_its_traceback(corpus, tmp_path, monkeypatch):
    """Only the user's mistakes become one line: an unexpected exception is not disguised as one."""
    def broken(self):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(DataTrainingArguments, "__post_init__", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        parse(["--model_type", "bert", "--train_file", str(corpus), "--output_dir", str(tmp_path)])

    def broken_value(self):
        raise ValueError("a bug's ValueError")

    monkeypatch.setattr(DataTrainingArguments, "__post_init__", broken_value)
    with pytest.raises(ValueError, match="a bug's ValueError") as info:
        parse(["--model_type", "bert", "--train_file", str(corpus), "--output_dir", str(tmp_path)])
    assert not isinstance(info.value, UsageError)


def test_a_mistyped_flag_gets_the_closest_flag_as_args_file_keys_do(corpus, tmp_path):
    # Before: "Some specified arguments are not used by the HfArgumentParser" (issue #31).
    base = ["--model_type", "bert", "--train_file", str(corpus), "--do_train", "--output_dir", str(tmp_path)]
    with pytest.raises(UsageError,
                       match=r"^unknown argument --evaluation_strategy \(did you mean --eval_strategy\?\)$"):
        parse([*base, "--evaluation_strategy", "steps"])
    with pytest.raises(UsageError, match=r"^unknown argument --learnin_rate \(did you mean --learning_rate\?\); "
                                         r"also --zzz$"):
        parse([*base, "--learnin_rate=1e-3", "--zzz", "1"])


def test_an_invalid_flag_value_is_one_line_without_the_usage_of_every_flag(corpus, tmp_path):
    # Before: argparse printed its usage, 160 lines of every flag, then the message (issue #31).
    result = subprocess.run(
        [sys.executable, "run_mlm.py", "--model_type", "bert", "--train_file", str(corpus), "--do_train",
         "--max_steps", "abc", "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: argument --max_steps/--max-steps: invalid int value: 'abc' (--help lists the flags)"]
    assert not (tmp_path / "out").exists()


def test_help_starts_with_what_the_script_does_the_args_file_and_the_readme(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "run_mlm.py"), "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]  # a "%" in a help text broke argparse's formatting
    head = "\n".join(result.stdout.splitlines()[:30])
    assert head.startswith("usage: run_mlm.py [ARGS_FILE.yaml|.json] [--flag VALUE ...]\n")
    assert "run_mlm.py configs/quickstart.yaml" in head and "args file (YAML or JSON)" in head
    assert "README.md" in head and "--KEY none" in head
    text = result.stdout
    # This project's flags before transformers'; each --no_X says what it does instead of repeating --X.
    assert text.index("--model_name_or_path") < text.index("--max_seq_length") < text.index("--per_device_train")
    assert "Sets --scratch_recipe false." in text
    no_flag = text.split("--no_scratch_recipe")[1].split("\n  --")[0]
    assert "recipe, measured" not in no_flag
    assert "and 15%; about 1 block" in text  # a literal percent sign, as written
    # What --downstream_text_column_name defaults to, as the README says it.
    column = text.split("--downstream_text_column_name")[1].split("\n  --")[0]
    assert "text" in column.split("Its text column")[1]


def test_a_data_source_flag_replaces_the_args_file_data_source(tmp_path, corpus):
    # `configs/quickstart.yaml --train_file corpus.txt`: the file's built-in corpus gives way.
    model_args, data_args, _ = parse([str(REPO / "configs/quickstart.yaml"), "--train_file", str(corpus),
                                      "--output_dir", str(tmp_path / "out")])
    assert data_args.train_file == [str(corpus)] and data_args.builtin_corpus is None
    assert model_args.model_type == "modernbert"  # the rest of the file stays
    check_run_arguments(model_args, data_args, _)


def test_key_none_unsets_an_args_file_key(tmp_path, corpus):
    config = write(tmp_path / "run.yaml", BASE_YAML.format(train=corpus, out=tmp_path / "out")
                   + "builtin_corpus: python_docstrings\nmax_train_time: 2h\n")
    model_args, data_args, training_args = parse([config, "--builtin_corpus", "none", "--max_train_time=None"])
    assert data_args.builtin_corpus is None and model_args.max_train_time is None
    assert data_args.train_file == [str(corpus)]
    # transformers' flags keep "none" as a value.
    _, _, training_args = parse([config, "--builtin_corpus", "none", "--report_to", "none"])
    assert training_args.report_to in ("none", ["none"], [])
