"""Did the MLM training help? Fine-tune each model on the same labelled task over several seeds, and compare.

    python -m utils.tools.downstream --models base=bert-base-uncased adapted=outputs/my-bert \\
        --train_file train.csv --validation_file dev.csv --label_column_name label --seeds 5 \\
        --output_dir outputs/downstream
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml -m utils.tools.downstream ARGS

Every model is fine-tuned for sequence classification (AutoModelForSequenceClassification,
the Trainer) on the same splits, with the same seeds and hyperparameters (any
TrainingArguments flag: --learning_rate, --num_train_epochs, ...). The first model is the
baseline: per-seed paired differences against it say whether a gain exceeds the seed
spread. Written to --output_dir: downstream_results.json, downstream_results.md (the
table), downstream_results.png (means with seed standard deviations), and a "Downstream"
section in the model card (README.md) of every local model compared.

Each split is tokenized once per distinct tokenizer and reused across seeds and models;
evaluation counts a confusion matrix on the device (no logits kept); the precision and CPU
choices of run_mlm.py apply.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run by its path: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from utils.backend import Backend  # noqa: E402
from utils.errors import UsageError, one_line  # noqa: E402
from utils.train.precision import PRECISIONS  # noqa: E402

logger = logging.getLogger(__name__)

RESULTS = "downstream_results"
CARD_SECTION = "## Downstream"


@dataclass
class DownstreamArguments:
    """What to compare, on which labelled data (the fine-tuning hyperparameters are TrainingArguments flags)."""

    models: list[str] = field(
        default=None, metadata={"help": "Models to compare, NAME=PATH_OR_HUB_ID (or just a path). The first is the "
                                        "baseline the others are compared with, seed by seed."})
    train_file: list[str] | None = field(default=None, metadata={"help": "Labelled training data (csv, json, jsonl, "
                                                                         "parquet)."})
    validation_file: list[str] | None = field(default=None, metadata={"help": "Labelled data to score on."})
    test_file: list[str] | None = field(default=None, metadata={"help": "Optional: also score on this split."})
    builtin_task: str | None = field(
        default=None, metadata={"help": "python_packages: which standard-library package a docstring comes from, "
                                        "built from this machine's Python at run time (offline)."})
    text_column_name: str | None = field(default=None, metadata={"help": "Text column (default: text, or the only "
                                                                           "string column)."})
    text_pair_column_name: str | None = field(default=None, metadata={"help": "Second text column, for pairs."})
    label_column_name: str = field(default="label", metadata={"help": "Label column (strings or integers)."})
    seeds: int = field(default=5, metadata={"help": "Seeds per model: --seed, --seed + 1, ..."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer texts are truncated to this many tokens."})
    precision: str = field(default="auto", metadata={"help": "As run_mlm.py's: auto, bf16, fp16, fp32.",
                                                     "choices": list(PRECISIONS)})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloads and built tasks are cached."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})

    def __post_init__(self):
        if not self.models:
            raise UsageError("--models: name at least one model, NAME=PATH_OR_HUB_ID")
        if self.seeds < 1:
            raise UsageError(f"--seeds {self.seeds}: fine-tune each model at least once (5 shows the seed spread)")
        for name in ("train_file", "validation_file", "test_file"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if self.builtin_task is None and not (self.train_file and self.validation_file):
            raise UsageError("--train_file and --validation_file: both are needed (or --builtin_task python_packages)")
        names = [name for name, _ in model_sources(self.models)]
        if len(set(names)) < len(names):
            raise UsageError(f"--models: names must differ ({', '.join(names)})")


def model_sources(models: list[str]) -> list[tuple[str, str]]:
    """[(name, path or hub id)] from NAME=SOURCE items (a bare SOURCE is named after its last path part)."""
    pairs = []
    for item in models:
        name, sep, source = item.partition("=")
        pairs.append((name, source) if sep else (Path(item).name or item, item))
    return pairs


# --- the task ------------------------------------------------------------------------------------

def load_task(args, training_args):
    """The splits as {split: Dataset(text[, text_pair], label)}, the label names, and a one-line description."""
    from datasets import Dataset, DatasetDict, load_dataset

    from utils.data.pipeline import find_text_column, resolve_data_files

    files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
    if args.builtin_task:
        from utils.data.corpus import build_labelled_task

        with training_args.main_process_first(desc="building the task"):
            files.update(build_labelled_task(args.builtin_task, args.cache_dir))
    raw = DatasetDict()
    for split, patterns in files.items():
        if not patterns:
            continue
        flag = f"{split}_file"
        builder, paths = resolve_data_files(patterns, flag)
        if builder == "text":
            raise UsageError(f"--{flag} {' '.join(paths)}: plain text has no labels; give csv, json, jsonl or parquet "
                             f"with a --label_column_name {args.label_column_name} column")
        raw[split] = load_dataset(builder, data_files=paths, split="train", cache_dir=args.cache_dir)
        columns = raw[split].column_names
        if args.label_column_name not in columns:
            raise UsageError(f"--label_column_name {args.label_column_name!r} is not a column of --{flag}; "
                             f"the columns are {columns}")
        if len(raw[split]) == 0:
            raise UsageError(f"--{flag} {' '.join(paths)} has no rows")
    text = find_text_column(raw["train"].column_names, raw["train"].features, args.text_column_name)
    pair = args.text_pair_column_name
    if pair is not None and pair not in raw["train"].column_names:
        raise UsageError(f"--text_pair_column_name {pair!r} is not a column; the columns are "
                         f"{raw['train'].column_names}")
    train_labels = [str(v) for v in raw["train"][args.label_column_name]]
    names = sorted(set(train_labels), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit()
                                                      else 0, v))
    if len(names) < 2:
        raise UsageError(f"--train_file: every row has the label {names[0]!r}; classification needs two labels or more")
    index = {name: i for i, name in enumerate(names)}
    task = DatasetDict()
    for split, dataset in raw.items():
        labels = [str(v) for v in dataset[args.label_column_name]]
        unseen = sorted(set(labels) - set(index))
        if unseen:
            raise UsageError(f"--{split}_file: label {unseen[0]!r} ({labels.count(unseen[0])} rows) never appears in "
                             f"--train_file, so no model can learn it; the training labels are {names}")
        columns = {"text": [t or "" for t in dataset[text]], "label": [index[v] for v in labels]}
        if pair:
            columns["text_pair"] = [t or "" for t in dataset[pair]]
        task[split] = Dataset.from_dict(columns)
    counts = [train_labels.count(name) for name in names]
    majority = max(range(len(names)), key=lambda i: counts[i])
    name = args.builtin_task or ", ".join(map(str, args.train_file if isinstance(args.train_file, list)
                                                else [args.train_file]))
    info = {"name": name, "labels": names, "train_size": len(task["train"]),
            "validation_size": len(task["validation"]),
            "majority_accuracy": sum(1 for v in task["validation"]["label"] if v == majority)
            / len(task["validation"])}
    if "test" in task:
        info["test_size"] = len(task["test"])
    return task, info


def tokenize(task, tokenizer, max_seq_length: int, pad: bool):
    """Token ids of every split, truncated to `max_seq_length` (padded to it on XLA, where shapes must not vary)."""
    from utils.data.encoding import exact_copy

    exact = exact_copy(tokenizer)

    def encode(batch):
        return exact(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_seq_length,
                     padding="max_length" if pad else False)

    return {split: dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c != "label"],
                               desc=f"Tokenizing {split}").rename_column("label", "labels")
            for split, dataset in task.items()}


# --- metrics, counted on the device --------------------------------------------------------------

class ConfusionCounts(TrainerCallback):
    """`compute_metrics` for batch-wise evaluation: a confusion matrix summed on the device; no logits are kept."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.matrix = None

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict:
        predictions = torch.as_tensor(eval_prediction.predictions).reshape(-1)
        labels = torch.as_tensor(eval_prediction.label_ids, device=predictions.device).reshape(-1)
        # one_hot, not bincount: a fixed output shape, which XLA compiles once.
        cells = labels.long() * self.num_labels + predictions.long()
        counts = torch.nn.functional.one_hot(cells, self.num_labels ** 2).sum(0)
        counts = counts.reshape(self.num_labels, self.num_labels)
        self.matrix = counts if self.matrix is None else self.matrix + counts
        return {"accuracy": self.matrix.diagonal().sum() / self.matrix.sum().clamp(min=1)}

    def result(self) -> dict:
        """Accuracy and macro-F1 of everything counted since the last reset."""
        matrix = self.matrix.double().cpu()
        true_positives = matrix.diagonal()
        precision = true_positives / matrix.sum(0).clamp(min=1)
        recall = true_positives / matrix.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        # sklearn's f1_score(average="macro"): over the labels that occur in the split or in the
        # predictions; a label that is in neither is not a 0 to average in.
        present = (matrix.sum(0) + matrix.sum(1)) > 0
        return {"accuracy": float(true_positives.sum() / matrix.sum()), "f1_macro": float(f1[present].mean())}

    def reset(self) -> None:
        self.matrix = None


def predicted_labels(logits, labels):
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


# --- fine-tuning -----------------------------------------------------------------------------------

_REPORTED_LOADS: set[str] = set()
# A sequence classifier's new weights: its head (and BERT's pooler, which MLM checkpoints lack).
_NEW_HEAD = ("classifier.", "score.", "pooler.", "pre_classifier.", "sequence_summary.", "head.")


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def loading_note(loading: dict) -> str | None:
    """What a classifier's loading info says beyond "the classification head is new" (None if nothing)."""
    missing = sorted(k for k in loading.get("missing_keys", ()) if not any(p in k for p in _NEW_HEAD))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in loading.get("mismatched_keys", ()))
    parts = [f"{len(missing)} weights not in the checkpoint, initialised at random ({', '.join(missing[:3])}"
             f"{', ...' if len(missing) > 3 else ''})"] if missing else []
    if mismatched:
        parts.append(f"{len(mismatched)} weights of another shape ({', '.join(mismatched[:3])})")
    return "; ".join(parts) or None


def finetune(source: str, tokenizer, data: dict, info: dict, training_args, seed: int, args,
             command_line: bool = False) -> dict:
    """Fine-tune `source` once with `seed`; returns validation (and test) accuracy and macro-F1, and the seconds."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, set_seed

    from utils.model.cpu import speed_up_for_cpu
    from utils.train.xla import XLAAutocast, start_replicas_equal

    class _Trainer(XLAAutocast, Trainer):  # bf16 on a TPU as run_mlm trains it (autocast, fp32 weights)
        pass

    started = time.time()
    # A copy with this seed (not dataclasses.replace: that would check the arguments again, and
    # bf16 chosen on a CPU fails transformers' check of --bf16 without --use_cpu).
    run_args = copy.copy(training_args)
    run_args.seed = seed
    run_args.output_dir = str(Path(training_args.output_dir) / "runs" / f"seed-{seed}")
    set_seed(seed)  # the new classifier head starts from the seed
    labels = info["labels"]
    try:
        # transformers prints a LOAD REPORT table (with terminal colour codes) at every load of
        # a checkpoint without this head: once per model and seed. What it says, in one line,
        # once per model, unless it only says that the classification head is new.
        # (A filter, not a higher level: at WARNING or above, from_pretrained also checks the
        # tensor-parallel plan and warns that no layer was sharded.)
        transformers_log = logging.getLogger("transformers.modeling_utils")
        transformers_log.addFilter(_drop_load_report)
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, use_safetensors=True, cache_dir=args.cache_dir,
                token=args.token, output_loading_info=True)
        finally:
            transformers_log.removeFilter(_drop_load_report)
        note = loading_note(loading)
        if note and source not in _REPORTED_LOADS:
            _REPORTED_LOADS.add(source)
            logger.warning("Fine-tuning %s: %s", source, note)
    except OSError as e:
        raise UsageError(f"--models {source}: cannot load it as a model (not a local directory with safetensors "
                         f"weights, and not a hub id that resolves): {one_line(e)}") from e
    backend = Backend.of(run_args)
    if backend.cpu_kernels:
        speed_up_for_cpu(model, reuse_memory=command_line)
    counts = ConfusionCounts(len(labels))
    evaluation = data["validation"]
    trainer = _Trainer(model=model, args=run_args, train_dataset=data["train"], eval_dataset=evaluation,
                       data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
                       compute_metrics=counts, preprocess_logits_for_metrics=predicted_labels)
    if backend.xla:  # a new classifier head: the same on every replica
        start_replicas_equal(trainer.model, run_args.world_size)
    trainer.train()
    scores = {}
    for split, dataset in (("validation", evaluation), ("test", data.get("test"))):
        if dataset is None:
            continue
        counts.reset()
        trainer.evaluate(dataset, metric_key_prefix=split)
        scores[split] = counts.result()
    return {"seed": seed, **scores["validation"],
            **({f"test_{k}": v for k, v in scores["test"].items()} if "test" in scores else {}),
            "seconds": time.time() - started}


def compare(args, training_args, command_line: bool = False, cards: set[str] | None = None) -> dict:
    """Fine-tune every model with every seed; return (and on the main process, write) the summary.

    `cards`: the names of the models whose (local) model card gets the table; all by default.
    """
    from transformers import AutoConfig

    from utils.data.corpus import run_cache_dir
    from utils.data.prepared import tokenizer_fingerprint
    from utils.data.tokenizer import load_pretrained_tokenizer
    from utils.logs import log_process
    from utils.train import xla
    from utils.train.effective_args import settle_for_finetuning
    from utils.train.precision import gemm_shapes

    sources = model_sources(args.models)
    configs = []
    for name, source in sources:  # every model loads before any is trained
        try:
            configs.append(AutoConfig.from_pretrained(source, cache_dir=args.cache_dir, token=args.token))
        except (OSError, ValueError) as e:
            raise UsageError(f"--models {name}={source}: not a local model directory nor a hub id that resolves "
                             f"({one_line(e)})") from e
    shapes = gemm_shapes(configs[0], training_args.per_device_train_batch_size * args.max_seq_length)
    settled = settle_for_finetuning(args, training_args, precision_shapes=shapes,
                                    cache_dir=run_cache_dir(args.cache_dir))
    on_xla = xla.on_xla(training_args)
    task, info = load_task(args, training_args)
    log_process(training_args)
    logger.info("Set by this tool:\n%s", settled.describe())
    seeds = [training_args.seed + i for i in range(args.seeds)]
    logger.info("Comparing %s on %d labels (%d training, %d validation examples; majority class %.4f), seeds %s",
                ", ".join(name for name, _ in sources), len(info["labels"]), info["train_size"],
                info["validation_size"], info["majority_accuracy"], ", ".join(map(str, seeds)))
    model_args = SimpleNamespace(cache_dir=args.cache_dir, use_fast_tokenizer=True, model_revision="main",
                                 token=args.token, trust_remote_code=False)
    tokenized: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    for name, source in sources:
        tokenizer = load_pretrained_tokenizer(source, model_args, "models")
        key = tokenizer_fingerprint(tokenizer)
        if key not in tokenized:  # once per distinct tokenizer, for every seed and model that shares it
            with training_args.main_process_first(desc="tokenizing"):
                tokenized[key] = tokenize(task, tokenizer, args.max_seq_length, pad=on_xla)
            if on_xla:  # whole batches only: one evaluation shape
                tokenized[key]["validation"] = xla.trim_to_full_batches(
                    tokenized[key]["validation"], training_args.per_device_eval_batch_size, training_args.world_size)
        runs[name] = []
        for seed in seeds:
            result = finetune(source, tokenizer, tokenized[key], info, training_args, seed, args, command_line)
            logger.info("%s, seed %d: accuracy %.4f, macro-F1 %.4f (%.0f s)", name, seed, result["accuracy"],
                        result["f1_macro"], result["seconds"])
            runs[name].append(result)
    hyperparameters = {"learning_rate": training_args.learning_rate, "num_train_epochs": training_args.num_train_epochs,
                       "max_steps": training_args.max_steps,
                       "per_device_train_batch_size": training_args.per_device_train_batch_size,
                       "world_size": training_args.world_size, "weight_decay": training_args.weight_decay,
                       "warmup_steps": training_args.warmup_steps, "max_seq_length": args.max_seq_length,
                       "precision": training_args.mixed_precision, "seeds": seeds}
    summary = summarize(runs, info, hyperparameters)
    if training_args.process_index == 0:
        write_outputs(summary, Path(training_args.output_dir),
                      {name: source for name, source in sources if cards is None or name in cards})
    return summary


# --- the comparison --------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_t_test(differences: list[float], level: float = 0.95) -> dict:
    """The two-sided p-value of "the mean difference is 0" and the `level` confidence interval of the mean.

    None for fewer than two seeds. Differences all equal: p is 1 when they are 0, else 0, and
    the interval is that value (scipy would give nan for a spread of 0).
    """
    from scipy import stats

    n = len(differences)
    if n < 2:
        return {"p_value": None, "ci95": None, "significant": False}
    mean, std = _mean_std(differences)
    if std == 0:
        p, low, high = (1.0 if mean == 0 else 0.0), mean, mean
    else:
        p = float(stats.ttest_rel(differences, [0.0] * n).pvalue)
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / n ** 0.5
        low, high = mean - half, mean + half
    return {"p_value": p, "ci95": [low, high], "significant": p < 1 - level}


def summarize(runs: dict[str, list[dict]], task: dict, hyperparameters: dict) -> dict:
    """Means and sample standard deviations over seeds, and per-seed paired differences against the first model.

    Each model against the first: a paired t-test over the seeds (two-sided p-value) and the
    95% confidence interval of the mean gain; "significant" means p < 0.05 (two seeds or more).
    """
    names = list(runs)
    summary: dict = {}
    base = {r["seed"]: r for r in runs[names[0]]}
    for name in names:
        entry = {}
        for metric in ("accuracy", "f1_macro"):
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = _mean_std([r[metric] for r in runs[name]])
        entry["per_seed"] = [{k: r[k] for k in ("seed", "accuracy", "f1_macro") if k in r} for r in runs[name]]
        for r, row in zip(runs[name], entry["per_seed"]):
            row.update({k: v for k, v in r.items() if k.startswith("test_")})
        entry["seconds_per_run"] = [round(r["seconds"], 1) for r in runs[name]]
        if name != names[0]:
            paired = {}
            for metric in ("accuracy", "f1_macro"):
                differences = [r[metric] - base[r["seed"]][metric] for r in runs[name] if r["seed"] in base]
                mean, std = _mean_std(differences)
                paired[metric] = {"differences": differences, "mean": mean, "std": std,
                                  **paired_t_test(differences)}
            entry[f"vs_{names[0]}"] = paired
        summary[name] = entry
    summary["task"] = task
    summary["hyperparameters"] = hyperparameters
    return summary


def markdown_table(summary: dict) -> str:
    names = [k for k in summary if k not in ("task", "hyperparameters")]
    base = names[0]
    n = len(summary[base]["per_seed"])
    lines = [f"| model | accuracy (mean ± sd, {n} seeds) | macro-F1 (mean ± sd) | accuracy vs {base} "
             "(paired mean, 95% CI) | p (paired t-test) | significant at 5% | seconds per run |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        entry = summary[name]
        paired = entry.get(f"vs_{base}", {}).get("accuracy")
        if not paired:
            versus, p, significant = "(baseline)", "", ""
        elif paired["p_value"] is None:
            versus, p, significant = f"{paired['mean']:+.4f} (1 seed: no interval)", "-", "-"
        else:
            low, high = paired["ci95"]
            versus = f"{paired['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"
            p, significant = f"{paired['p_value']:.3g}", "yes" if paired["significant"] else "no"
        seconds = sum(entry["seconds_per_run"]) / len(entry["seconds_per_run"])
        lines.append(f"| {name} | {entry['accuracy_mean']:.4f} ± {entry['accuracy_std']:.4f} | "
                     f"{entry['f1_macro_mean']:.4f} ± {entry['f1_macro_std']:.4f} | {versus} | {p} | "
                     f"{significant} | {seconds:.0f} |")
    task = summary["task"]
    lines += ["", f"Macro-F1 averages the labels that occur in the validation split or in the predictions "
                  "(sklearn's `f1_score(average=\"macro\")`). Majority class on the validation split: accuracy "
                  f"{task['majority_accuracy']:.4f}. "
                  f"{len(task['labels'])} labels, {task['train_size']} training and {task['validation_size']} "
                  "validation examples."]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    figure(summary).savefig(path, dpi=110)
    return path


def figure(summary: dict):
    """The bar chart of `plot`: accuracy and macro-F1 per model, the majority class, the task in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [k for k in summary if k not in ("task", "hyperparameters")]
    figure = Figure(figsize=(2.6 + 1.6 * len(names), 4.4))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    width = 0.38
    for offset, metric, label in ((-width / 2, "accuracy", "accuracy"), (width / 2, "f1_macro", "macro-F1")):
        axis.bar([i + offset for i in range(len(names))], [summary[n][f"{metric}_mean"] for n in names], width,
                 yerr=[summary[n][f"{metric}_std"] for n in names], capsize=4, label=label)
    axis.axhline(summary["task"]["majority_accuracy"], color="gray", linestyle="--", linewidth=1,
                 label="majority class")
    axis.set_xticks(range(len(names)), names)
    axis.set_ylim(0, 1)
    axis.set_ylabel("validation score (mean ± sd over seeds)")
    task = summary["task"]
    seeds = len(summary[names[0]]["per_seed"])
    axis.set_title(f"Fine-tuned on {task.get('name', 'the task')} ({len(task['labels'])} labels, {seeds} seeds)",
                   fontsize=10)
    # Beside the axes, not over the bars (which reach the top for a good model).
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    figure.tight_layout()
    return figure


def write_outputs(summary: dict, output_dir: Path, sources: dict[str, str]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{RESULTS}.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_table(summary)
    (output_dir / f"{RESULTS}.md").write_text(table + "\n")
    plot(summary, output_dir / f"{RESULTS}.png")
    print("\n" + table, flush=True)
    for source in sources.values():
        if Path(source).is_dir():
            add_card_section(Path(source), table, summary)


def add_card_section(model_dir: Path, table: str, summary: dict) -> None:
    """Write (or replace) the "Downstream" section of a local model's card."""
    card = model_dir / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else f"# {model_dir.name}\n"
    if CARD_SECTION in text:
        before, _, after = text.partition(CARD_SECTION)
        rest = after.split("\n## ", 1)
        text = before.rstrip() + ("\n\n## " + rest[1] if len(rest) > 1 else "")
    hyper = summary["hyperparameters"]
    batch = f"{hyper['per_device_train_batch_size']} x {hyper['world_size']}"
    task = summary["task"]
    names = [k for k in summary if k not in ("task", "hyperparameters")]
    baseline = {UNTRAINED_NAME: f"`{UNTRAINED_NAME}` is this model with its random initial weights, before any "
                                "training step (does pretraining help at all?). ",
                START_NAME: f"`{START_NAME}` is the checkpoint training started from. "}.get(names[0], "")
    section = [CARD_SECTION, "", f"Task: {task.get('name', 'the labelled data')} ({len(task['labels'])} labels). "
               + baseline + "Each model fine-tuned for sequence classification with `utils/tools/downstream.py`, "
               f"the same seeds ({', '.join(map(str, hyper['seeds']))}) and hyperparameters for every model "
               f"(learning rate {hyper['learning_rate']}, {hyper['num_train_epochs']} epochs, batch {batch}, "
               f"sequences of {hyper['max_seq_length']} tokens):", "", table, ""]
    card.write_text(text.rstrip() + "\n\n" + "\n".join(section), encoding="utf-8")


UNTRAINED = ".downstream-untrained"
# run_mlm's baseline, as tables, plots and cards name it: from scratch, the model before its
# first step; adapting, the checkpoint it started from.
UNTRAINED_NAME, START_NAME = "untrained", "start"


def baseline_name(start: str) -> str:
    return UNTRAINED_NAME if Path(start).name == UNTRAINED else START_NAME


def save_untrained(model, tokenizer, training_args) -> str:
    """Save the model as built, before training: run_mlm's baseline when it trains from scratch."""
    path = Path(training_args.output_dir) / UNTRAINED
    if training_args.process_index == 0:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def compare_after_training(start: str, trained: str, check, max_seq_length: int | None, training_args,
                           command_line: bool = False) -> dict:
    """run_mlm's step 14: the starting point against the trained model, fine-tuned as `check` says.

    `check`: run_mlm's DownstreamCheckArguments (the downstream_* flags). Results go to
    OUTPUT_DIR/downstream/ and a "Downstream" section into the trained model's card.
    """
    import shutil

    from transformers import TrainingArguments

    args = DownstreamArguments(
        models=[f"{baseline_name(start)}={start}", f"trained={trained}"], train_file=check.downstream_train_file,
        validation_file=check.downstream_validation_file, builtin_task=check.downstream_builtin_task,
        text_column_name=check.downstream_text_column_name,
        text_pair_column_name=check.downstream_text_pair_column_name,
        label_column_name=check.downstream_label_column_name, seeds=check.downstream_seeds,
        max_seq_length=max_seq_length or 128)
    finetuning = TrainingArguments(
        output_dir=str(Path(trained) / "downstream"), learning_rate=check.downstream_learning_rate,
        num_train_epochs=check.downstream_num_train_epochs,
        per_device_train_batch_size=check.downstream_batch_size,
        per_device_eval_batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed,
        report_to=[], disable_tqdm=training_args.disable_tqdm, use_cpu=training_args.use_cpu,
        logging_steps=training_args.logging_steps)
    summary = compare(args, finetuning, command_line, cards={"trained"})
    if training_args.process_index == 0 and Path(start).name == UNTRAINED:
        shutil.rmtree(start, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None, command_line: bool = False) -> dict:
    """Parse the arguments, compare the models, write the results; returns the summary."""
    from transformers import HfArgumentParser, TrainingArguments

    from utils.args import given_keys, parse_args
    from utils.logs import setup_logging
    from utils.train import distributed
    from utils.train.cpu_process import fit_cpu_threads

    distributed.join_cpu_process_group()
    parser = HfArgumentParser((DownstreamArguments, TrainingArguments))
    args, training_args = parse_args(parser, argv)
    if "report_to" not in given_keys(argv):
        training_args.report_to = []  # a comparison of many short runs: no TensorBoard logs unless asked
    setup_logging(training_args)
    fit_cpu_threads(training_args)
    summary = compare(args, training_args, command_line)
    if command_line:
        distributed.leave_process_group()
    return summary


if __name__ == "__main__":
    from utils.errors import exit_on_usage_error

    exit_on_usage_error(main)(command_line=True)
