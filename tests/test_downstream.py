"""Downstream comparison: fine-tune models on a labelled task over seeds, aggregate, write the table and the cards."""

import json
import random

import pytest
from transformers import BertConfig, BertForMaskedLM

from utils.data.tokenizer import train_wordpiece_tokenizer
from utils.errors import UsageError
from utils.tools.downstream import ConfusionCounts, main, markdown_table, summarize

from .conftest import REPO, accelerate_launch

ANIMALS = ["the cat", "the dog", "a bird", "a horse"]
PEOPLE = ["the old man", "my sister", "the teacher", "a small child"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "calls"]
OBJECTS = ["the red ball", "a green tree", "the river", "a tall house", "the blue sky", "an apple"]


def labelled_rows(n, seed):
    """Sentences whose label (animal or person) is decided by their subject: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["animal", "person"])
        subject = rng.choice(ANIMALS if label == "animal" else PEOPLE)
        rows.append((f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)} .", label))
    return rows


def write_csv(path, rows, header=("text", "label")):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    return write_csv(root / "train.csv", labelled_rows(320, 0)), write_csv(root / "dev.csv", labelled_rows(80, 1))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny BERT (no dropout, so runs compare exactly) and its tokenizer, saved like a run_mlm output."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    texts = [text for text, _ in labelled_rows(400, 2)]
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=120, model_max_length=64)
    tokenizer.save_pretrained(path)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForMaskedLM(config).save_pretrained(path)
    (path / "README.md").write_text("# tiny\n\nA card.\n\n## Use\n\nSomething.\n")
    return path


def run_args(out, task, models, *extra):
    train, dev = task
    return ["--models", *models, "--train_file", train, "--validation_file", dev, "--seeds", "2",
            "--output_dir", str(out), "--learning_rate", "5e-3", "--num_train_epochs", "4",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--max_seq_length", "32",
            "--precision", "fp32", "--disable_tqdm", "true", "--logging_steps", "50", *extra]


def test_comparison_beats_the_majority_and_writes_everything(tmp_path, task, tiny_model, capfd, caplog):
    with caplog.at_level("INFO", logger="utils.tools.downstream"):
        summary = main(run_args(tmp_path / "out", task, [f"base={tiny_model}", f"again={tiny_model}"]))
    # Its changes to the TrainingArguments are made in one place (utils.train.effective_args) and logged once.
    assert "Set by this tool:\n  save_strategy: 'steps' -> 'no' (a fine-tuning run is scored, not kept)" in caplog.text
    # transformers' LOAD REPORT table (4 loads here) only says that the classifier is new: not shown (issue #31).
    output = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in output and "\x1b[" not in output and "were not sharded" not in output
    saved = json.loads((tmp_path / "out" / "downstream_results.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["task"]["labels"] == ["animal", "person"] and saved["task"]["train_size"] == 320
    majority = saved["task"]["majority_accuracy"]
    assert 0.4 < majority < 0.65
    for name in ("base", "again"):
        entry = saved[name]
        assert [r["seed"] for r in entry["per_seed"]] == [42, 43]
        assert entry["accuracy_mean"] > majority + 0.25, entry  # the subject decides the label: it learns
        assert 0 <= entry["f1_macro_mean"] <= 1 and entry["accuracy_std"] >= 0
    # The same model with the same seeds gives the same runs: paired differences of zero.
    paired = saved["again"]["vs_base"]["accuracy"]
    assert paired["differences"] == [0.0, 0.0] and paired["p_value"] == 1.0 and not paired["significant"]
    assert saved["hyperparameters"]["learning_rate"] == 5e-3 and saved["hyperparameters"]["seeds"] == [42, 43]
    table = (tmp_path / "out" / "downstream_results.md").read_text()
    assert "| base |" in table and "| again |" in table and "Majority class on the validation split" in table
    assert (tmp_path / "out" / "downstream_results.png").read_bytes()[:4] == b"\x89PNG"
    card = (tiny_model / "README.md").read_text()
    assert card.count("## Downstream") == 1 and "## Use" in card and "| base |" in card


def test_pairs_other_column_names_a_test_split_and_a_sentence_transformers_checkpoint(tmp_path):
    """Text pairs, columns named otherwise, --test_file, and an encoder without MLM head whose tokenizer.json pads."""
    from .test_tokenization_fidelity import sentence_transformers_checkpoint

    checkpoint = sentence_transformers_checkpoint(tmp_path)

    def pairs(n, seed):
        return [(a, b, "same" if label_a == label_b else "different")
                for (a, label_a), (b, label_b) in zip(labelled_rows(n, seed), labelled_rows(n, seed + 100))]

    header = ("first", "second", "relation")
    train = write_csv(tmp_path / "train.csv", pairs(160, 0), header)
    dev = write_csv(tmp_path / "dev.csv", pairs(40, 1), header)
    test = write_csv(tmp_path / "test.csv", pairs(40, 2), header)
    summary = main(["--models", f"st={checkpoint}", "--train_file", train, "--validation_file", dev,
                    "--test_file", test, "--text_column_name", "first", "--text_pair_column_name", "second",
                    "--label_column_name", "relation", "--seeds", "1", "--output_dir", str(tmp_path / "out"),
                    "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--max_seq_length", "32",
                    "--precision", "fp32", "--disable_tqdm", "true"])
    assert summary["task"]["labels"] == ["different", "same"] and summary["task"]["test_size"] == 40
    run = summary["st"]["per_seed"][0]
    assert 0 <= run["accuracy"] <= 1 and 0 <= run["test_accuracy"] <= 1 and 0 <= run["test_f1_macro"] <= 1
    assert "## Downstream" in (checkpoint / "README.md").read_text()


def test_aggregation_against_hand_computed_values():
    runs = {
        "base": [{"seed": 1, "accuracy": 0.50, "f1_macro": 0.40, "seconds": 1.0},
                 {"seed": 2, "accuracy": 0.60, "f1_macro": 0.50, "seconds": 1.0},
                 {"seed": 3, "accuracy": 0.70, "f1_macro": 0.60, "seconds": 1.0}],
        "adapted": [{"seed": 1, "accuracy": 0.60, "f1_macro": 0.40, "seconds": 2.0},
                    {"seed": 2, "accuracy": 0.72, "f1_macro": 0.52, "seconds": 2.0},
                    {"seed": 3, "accuracy": 0.78, "f1_macro": 0.57, "seconds": 2.0}],
    }
    summary = summarize(runs, {"labels": ["a", "b"], "train_size": 10, "validation_size": 5,
                               "majority_accuracy": 0.6}, {})
    assert summary["base"]["accuracy_mean"] == pytest.approx(0.6)
    assert summary["base"]["accuracy_std"] == pytest.approx(0.1)  # sample sd of 0.5, 0.6, 0.7
    assert summary["adapted"]["accuracy_mean"] == pytest.approx((0.60 + 0.72 + 0.78) / 3)
    paired = summary["adapted"]["vs_base"]["accuracy"]
    assert paired["differences"] == pytest.approx([0.10, 0.12, 0.08])
    assert paired["mean"] == pytest.approx(0.10) and paired["std"] == pytest.approx(0.02)
    # A paired t-test on 2 degrees of freedom, whose CDF is 1/2 + t / (2 sqrt(2 + t^2)): t = 0.1 / (0.02 / sqrt 3).
    t = 0.1 / (0.02 / 3 ** 0.5)
    assert paired["p_value"] == pytest.approx(2 * (0.5 - t / (2 * (2 + t * t) ** 0.5)), rel=1e-6)  # 0.0131
    assert paired["significant"]
    half = 4.302653 * 0.02 / 3 ** 0.5  # t quantile 0.975 at 2 degrees of freedom
    assert paired["ci95"] == pytest.approx([0.1 - half, 0.1 + half], rel=1e-5)
    f1 = summary["adapted"]["vs_base"]["f1_macro"]
    assert f1["differences"] == pytest.approx([0.0, 0.02, -0.03]) and not f1["significant"]
    table = markdown_table(summary)
    assert "| adapted | 0.7000 ± 0.0917 |" in table and "| +0.1000 [+0.0503, +0.1497] | 0.0131 | yes |" in table


def test_a_gain_above_the_seed_spread_at_two_seeds_is_not_called_significant():
    # Before: "gain > seed spread" was mean > sd (t > sqrt n), p ~ 0.37 here, and said "yes" (issue #30).
    import math

    runs = {"base": [{"seed": s, "accuracy": 0.5, "f1_macro": 0.5, "seconds": 1.0} for s in (1, 2)],
            "adapted": [{"seed": 1, "accuracy": 0.60, "f1_macro": 0.5, "seconds": 1.0},
                        {"seed": 2, "accuracy": 0.52, "f1_macro": 0.5, "seconds": 1.0}]}
    summary = summarize(runs, {"labels": ["a", "b"], "train_size": 10, "validation_size": 5,
                               "majority_accuracy": 0.5}, {})
    paired = summary["adapted"]["vs_base"]["accuracy"]
    assert paired["mean"] > paired["std"]
    t = paired["mean"] / (paired["std"] / math.sqrt(2))  # 1 degree of freedom: Cauchy, CDF 1/2 + atan(t) / pi
    assert paired["p_value"] == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-6)
    assert not paired["significant"] and "| no |" in markdown_table(summary)


def test_confusion_counts_give_accuracy_and_macro_f1():
    import torch
    from transformers import EvalPrediction

    counts = ConfusionCounts(3)
    counts(EvalPrediction(predictions=torch.tensor([0, 1, 1, 2]), label_ids=torch.tensor([0, 1, 2, 2])), False)
    counts(EvalPrediction(predictions=torch.tensor([0, 0]), label_ids=torch.tensor([0, 1])), True)
    result = counts.result()
    assert result["accuracy"] == pytest.approx(4 / 6)
    # per class: 0: p 2/3 r 1 -> 0.8; 1: p 1/2 r 1/2 -> 0.5; 2: p 1 r 1/2 -> 2/3
    assert result["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_leaves_out_a_label_absent_from_the_split_and_the_predictions_as_sklearn_does():
    import torch
    from transformers import EvalPrediction

    # 3 labels; the validation split holds 0 and 1 only, and nothing predicts 2.
    counts = ConfusionCounts(3)
    counts(EvalPrediction(predictions=torch.tensor([0, 0, 1, 1, 0]), label_ids=torch.tensor([0, 0, 1, 1, 1])), True)
    # label 0: p 2/3 r 1 -> 0.8; label 1: p 1 r 2/3 -> 0.8 (sklearn: f1_score(average="macro") = 0.8, not 0.533)
    assert counts.result()["f1_macro"] == pytest.approx(0.8)


@pytest.mark.parametrize("case", ["no_label", "one_class", "unseen", "empty", "ambiguous", "seeds", "model"])
def test_bad_input_is_one_clear_line(case, tmp_path, task, tiny_model):
    train, dev = task
    models = [f"base={tiny_model}"]
    extra = []
    if case == "no_label":
        extra, message = ["--label_column_name", "category"], r"--label_column_name 'category' is not a column " \
                                                              r"of --train_file; the columns are \['text', 'label'\]"
    elif case == "one_class":
        train = write_csv(tmp_path / "one.csv", [("a cat", "animal")] * 5)
        message = r"every row has the label 'animal'; classification needs two labels or more"
    elif case == "unseen":
        dev = write_csv(tmp_path / "dev.csv", [("a cat", "animal"), ("a rock", "mineral")])
        message = r"--validation_file: label 'mineral' \(1 rows\) never appears in --train_file"
    elif case == "empty":
        (tmp_path / "empty.csv").write_text("")
        dev, message = str(tmp_path / "empty.csv"), r"--validation_file .*empty\.csv is empty"
    elif case == "ambiguous":
        train = write_csv(tmp_path / "two.csv", [("a cat", "the title", "animal")] * 4, ("body", "title", "label"))
        message = r"no 'text' column and 3 string columns .*name the column with --text_column_name"
    elif case == "seeds":
        extra, message = ["--seeds", "0"], r"--seeds 0: fine-tune each model at least once"
    else:
        models, message = ["base=/nonexistent/model-dir"], r"--models base=/nonexistent/model-dir: not a local " \
                                                          r"model directory nor a hub id"
    args = run_args(tmp_path / "out", (train, dev), models, *extra)
    if case == "seeds":
        args[args.index("--seeds") + 1] = "0"
    with pytest.raises(UsageError, match=message) as error:
        main(args)
    assert "\n" not in str(error.value)


def test_two_processes_give_the_one_process_results(tmp_path, task, tiny_model):
    def launch(config, out, batch):
        args = run_args(out, task, [f"m={tiny_model}"])
        args[args.index("--per_device_train_batch_size") + 1] = str(batch)
        args[args.index("--seeds") + 1] = "1"
        return accelerate_launch(config, args, launcher_args=["-m"], env={"HF_HOME": str(tmp_path / "hf")},
                                 script="utils.tools.downstream")

    one = launch("accelerate_configs/cpu.yaml", tmp_path / "one", 16)
    two = launch("accelerate_configs/multi_cpu.yaml", tmp_path / "two", 8)
    for result in (one, two):
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = (json.loads((tmp_path / d / "downstream_results.json").read_text())["m"]["per_seed"][0]
                     for d in ("one", "two"))
    assert second["accuracy"] == pytest.approx(first["accuracy"], abs=1e-6)
    assert second["f1_macro"] == pytest.approx(first["f1_macro"], abs=1e-6)


def test_run_mlm_compares_the_untrained_and_the_trained_model(tmp_path, corpus):
    from run_mlm import main as run_mlm

    from .conftest import tiny_run_args

    # Columns named otherwise, as a user's file may have them.
    header = ("sentence", "category")
    train = write_csv(tmp_path / "train.csv", labelled_rows(320, 0), header)
    dev = write_csv(tmp_path / "dev.csv", labelled_rows(80, 1), header)
    metrics = run_mlm(tiny_run_args(tmp_path / "out", corpus, "--downstream_train_file", train,
                                    "--downstream_validation_file", dev, "--downstream_seeds", "2",
                                    "--downstream_learning_rate", "5e-3", "--downstream_num_train_epochs", "2",
                                    "--downstream_text_column_name", "sentence",
                                    "--downstream_label_column_name", "category", "--downstream_batch_size", "16"))
    # The baseline is named as the README names it, and the card says what it is and the task (issue #31).
    assert set(metrics["downstream"]) == {"untrained", "trained"}
    saved = json.loads((tmp_path / "out" / "downstream" / "downstream_results.json").read_text())
    assert set(saved) == {"untrained", "trained", "task", "hyperparameters"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Downstream" in card and "| untrained |" in card and "| trained |" in card
    assert f"Task: {train} (2 labels). `untrained` is this model with its random initial weights" in card
    assert not (tmp_path / "out" / ".downstream-untrained").exists()  # the baseline's weights are not left behind


def test_downstream_arguments_are_documented():
    import dataclasses

    from utils.tools.downstream import DownstreamArguments

    readme = (REPO / "README.md").read_text()
    for f in dataclasses.fields(DownstreamArguments):
        assert f"--{f.name}" in readme, f.name


def test_the_plot_has_a_title_naming_the_task_and_its_legend_covers_no_bar():
    from utils.tools.downstream import figure, summarize

    runs = {name: [{"seed": seed, "accuracy": acc, "f1_macro": acc - 0.01, "seconds": 1.0} for seed in (1, 2, 3)]
            for name, acc in (("untrained", 0.95), ("trained", 0.98))}
    summary = summarize(runs, {"name": "python_packages", "labels": ["a", "b", "c", "d"], "train_size": 10,
                               "validation_size": 10, "majority_accuracy": 0.3}, {})
    fig = figure(summary)
    axis = fig.axes[0]
    assert axis.get_title() == "Fine-tuned on python_packages (4 labels, 3 seeds)"
    renderer = fig.canvas.get_renderer()
    legend = axis.get_legend().get_window_extent(renderer)
    bars = [patch.get_window_extent(renderer) for patch in axis.patches]
    assert len(bars) == 4 and not any(legend.overlaps(bar) for bar in bars)
