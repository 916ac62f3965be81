"""What a run leaves for people: the resolved arguments (an args file) and a model card."""

from __future__ import annotations

import dataclasses
import enum
import os
import shlex
import sys
from pathlib import Path

import yaml

from utils.data.masking import eval_probability

# Never written to disk: credentials.
SECRET_FIELDS = {"token", "hub_token"}
RUN_ARGS_FILE = "run_args.yaml"


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def non_default_args(*arg_groups) -> dict:
    """The fields of the argument dataclasses that differ from their defaults, as plain values.

    TrainingArguments fills some fields in __post_init__ (eval_steps from logging_steps,
    ...); those are compared against a default instance so that only real choices remain.
    """
    from transformers import TrainingArguments

    values = {}
    for group in arg_groups:
        if isinstance(group, TrainingArguments):
            current, default = group.to_dict(), TrainingArguments().to_dict()
        else:
            current = {f.name: getattr(group, f.name) for f in dataclasses.fields(group)}
            default = {f.name: _field_default(f) for f in dataclasses.fields(group)}
        for name, value in current.items():
            value = _plain(value)
            if name in SECRET_FIELDS or name.startswith("_") or value == _plain(default.get(name)):
                continue
            values[name] = value
    return values


def write_run_args(output_dir: str, run_args: dict) -> Path:
    """Write `run_args` (from `non_default_args`) as an args file: `python run_mlm.py <it>` reruns the training."""
    path = Path(output_dir) / RUN_ARGS_FILE
    header = (f"# The arguments of this run (defaults omitted). Rerun with:\n"
              f"#   python run_mlm.py {path} --output_dir NEW_DIR\n")
    path.write_text(header + yaml.safe_dump(run_args, sort_keys=False), encoding="utf-8")
    return path


def redacted_command(argv: list[str]) -> str:
    """The command line as typed, with the value of any token flag replaced."""
    shown, hide_next = [], False
    for arg in argv:
        if hide_next:
            shown.append("<redacted>")
            hide_next = False
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("--") and name in SECRET_FIELDS:
            if "=" in arg:
                shown.append(f"--{name}=<redacted>")
            else:
                shown.append(arg)
                hide_next = True
            continue
        shown.append(arg)
    return " ".join(shlex.quote(a) for a in shown)


def _data_description(data_args) -> str:
    if data_args.dataset_name:
        config = f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else ""
        return f"the hub dataset `{data_args.dataset_name}`{config}"
    if data_args.builtin_corpus:
        return (f"the builtin corpus `{data_args.builtin_corpus}` (English prose from the docstrings of "
                f"Python {sys.version_info.major}.{sys.version_info.minor}'s standard library, gathered at run time)")
    return "local files: " + ", ".join(f"`{os.path.basename(f)}`" for f in data_args.train_file or [])


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _token_counts(data_stats: dict) -> list[str]:
    """A line per split: the tokens the text gave, beside its characters (none for a stream)."""
    lines = []
    for split, name in (("train", "Training"), ("validation", "Evaluation")):
        counts = data_stats.get(split)
        if not counts or counts.get("tokens") is None:
            continue
        characters = counts.get("characters")
        lost = counts.get("tokens_lost")
        lines.append(f"- {name} text: {counts['tokens']:,} tokens"
                     + (f" from {characters:,} characters" if characters else "")
                     + (f", {lost:,} of them left over in the last partial block" if lost else "") + ".")
    return lines


def _usage(output_dir: str, mask_token: str, fill_mask: tuple[list[str], list] | None) -> list[str]:
    """The card's "Use" section: the run's own fill-mask sentences, and what the model answered."""
    from utils.tools.fill_mask import adapt_mask_token

    sentences, predictions = fill_mask if fill_mask else ([f"A {mask_token} example."], None)
    lines = ["", "## Use", "", "```python", "from transformers import pipeline", "",
             f'fill = pipeline("fill-mask", model="{output_dir}")']
    lines += [f"print(fill({adapt_mask_token(sentence, mask_token)!r}))" for sentence in sentences[:3]]
    lines += ["```", ""]
    if predictions:
        lines += ["What this model answers (top 5, from the end of the run):", ""]
        for sentence, per_mask in zip(sentences, predictions):
            answers = " / ".join(", ".join(c["token_str"].strip() for c in candidates) for candidates in per_mask)
            lines.append(f"- {adapt_mask_token(sentence, mask_token)} -> {answers}")
        lines.append("")
    lines += [f"Or: `python -m utils.tools.fill_mask {output_dir} \"... {mask_token} ...\"` from the run_mlm checkout.",
              ""]
    return lines


def launcher() -> str:
    """How this process was launched, when a launcher started it: "accelerate launch --config_file X.yaml ".

    The launcher's arguments are not passed on to the script; they are read from the parent
    process's command line (Linux /proc), and left out where it cannot be read.
    """
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [part.decode("utf-8", "replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return ""
    names = [os.path.basename(part) for part in parent]
    ends = [i for i, name in enumerate(names) if script and name == script]
    # `accelerate launch`, `python -m accelerate.commands.launch`, `torchrun`, `python -m torch.distributed.run`
    for i, name in enumerate(names[:ends[0]] if ends else []):
        tool = ("accelerate launch" if (name == "accelerate" and names[i + 1:i + 2] == ["launch"])
                else "accelerate launch" if name == "accelerate.commands.launch"
                else "torchrun" if name in ("torchrun", "torch.distributed.run") else None)
        if tool:
            skip = 2 if name == "accelerate" else 1
            return f"{tool} {redacted_command(parent[i + skip:ends[0]])} ".replace("  ", " ")
    return ""


def write_model_card(output_dir: str, model, model_args, data_args, training_args, state, metrics: dict,
                     max_seq_length: int, tokenizer_source: str, mask_token: str, argv: list[str],
                     tokens_per_step: int | None = None, plot: str | None = None,
                     data_stats: dict | None = None, fill_mask: tuple[list[str], list] | None = None) -> Path:
    """Write README.md in `output_dir`: what was trained, on what, how, the results and how to rerun it.

    `data_stats`: per split, the counts `utils.data.pipeline.preprocess_datasets` (or a prepared
    dataset's manifest) gives: tokens, characters, tokens lost. `fill_mask`: the run's
    fill-mask sentences and the trained model's predictions, shown as the usage example.
    """
    import datasets
    import tokenizers
    import torch
    import transformers

    from utils.model.modeling import count_parameters

    name = Path(output_dir).resolve().name
    n_params = count_parameters(model)
    base = model_args.model_name_or_path
    on_hub = base is not None and not os.path.isdir(base)
    origin = ("trained from scratch" if base is None
              else f"adapted from [`{base}`](https://huggingface.co/{base})" if on_hub
              else f"adapted from `{base}`")
    front = {"library_name": "transformers", "pipeline_tag": "fill-mask", "tags": ["masked-lm", "run_mlm"]}
    if on_hub:
        front["base_model"] = base
    if data_args.dataset_name:
        front["datasets"] = [data_args.dataset_name]
    world = training_args.world_size
    global_batch = training_args.per_device_train_batch_size * world * training_args.gradient_accumulation_steps
    warmup = training_args.warmup_steps
    warmup = (f"warm-up {warmup:.0%} of the {'time budget' if 'train_time_budget' in metrics else 'steps'}"
              if 0 < warmup < 1 else f"{int(warmup)} warmup steps")
    schedule_span = " over the time budget" if "train_time_budget" in metrics else ""
    # mixed_precision also reflects an accelerate config's setting, which --bf16 does not.
    mixed = getattr(training_args, "mixed_precision", None) or ("bf16" if training_args.bf16 else "no")
    precision = "fp32" if mixed == "no" else f"{mixed} mixed"
    results = [(key, metrics[key]) for key in ("eval_loss", "perplexity", "eval_accuracy") if key in metrics]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"A `{model.config.model_type}` masked language model ({n_params / 1e6:.1f}M parameters), {origin}, "
        "with `run_mlm.py`.", "",
        "## Training data", "",
        f"- Text: {_data_description(data_args)}.",
        f"- Examples: {'one per line, truncated to' if data_args.line_by_line else 'packed blocks of'} "
        f"{max_seq_length} tokens; {metrics.get('train_samples', 'n/a')} for training, "
        f"{metrics.get('eval_samples', 'n/a')} held out for evaluation.",
        *_token_counts(data_stats or {}),
        f"- Tokenizer: {tokenizer_source}.", "",
        "## Training", "",
        f"- Steps: {state.global_step} ({state.epoch or 0:.2f} epochs), global batch {global_batch} "
        f"({training_args.per_device_train_batch_size} per device x {world} processes x "
        f"{training_args.gradient_accumulation_steps} accumulation).",
        f"- Optimizer: {_plain(training_args.optim)}, learning rate {training_args.learning_rate}, "
        f"{_plain(training_args.lr_scheduler_type)} schedule{schedule_span}, {warmup}, "
        f"weight decay {training_args.weight_decay}.",
        f"- Masking: {data_args.mlm_probability:.0%} of tokens in training, {eval_probability(data_args):.0%} in "
        "evaluation "
        f"({data_args.mask_replace_prob:.0%} [MASK] / {data_args.random_replace_prob:.0%} random / rest kept)"
        f"{', whole words' if data_args.whole_word_mask else ''}.",
        f"- Precision: {precision}. Seed: {training_args.seed}.",
        *([f"- Tokens seen: {state.global_step * tokens_per_step:,} "
           f"({'rows x max_seq_length' if data_args.line_by_line else 'packed blocks'})."] if tokens_per_step else []),
        *([f"- Training time: {_duration(metrics['train_runtime'])} on {world} process(es) "
           f"({training_args.device.type})"
           + (f", in {metrics['train_segments']} segments (stopped and resumed; the time of the steps kept)"
              if metrics.get("train_segments", 1) > 1 else "") + "."] if "train_runtime" in metrics else []),
        *([f"- Time budget (--max_train_time): {_duration(metrics['train_time_budget'])}, "
           f"{_duration(metrics['train_time_budget_used'])} used; "
           f"{'stopped at the deadline' if metrics.get('train_time_budget_reached') else 'ended before it'}."]
          if "train_time_budget" in metrics else []),
        "",
        "## Results on the held-out set", "",
        "Evaluation masks are drawn once with the run's seed, so the numbers compare across steps.", "",
        "| " + " | ".join(k for k, _ in results) + " |" if results else "No evaluation was run.",
    ]
    if results:
        lines += ["|" + "---|" * len(results), "| " + " | ".join(_fmt(v) for _, v in results) + " |"]
    before = next((log for log in state.log_history if log.get("step") == 0 and "eval_loss" in log), None)
    if before and results:
        lines += ["", f"Before training (step 0, `eval_on_start`): eval_loss {_fmt(before['eval_loss'])}"
                  + (f", eval_accuracy {_fmt(before['eval_accuracy'])}" if "eval_accuracy" in before else "") + "."]
    if plot:
        lines += ["", f"![Train and eval loss, learning rate]({plot})"]
    lines += [
        *_usage(output_dir, mask_token, fill_mask),
        "## Reproduce", "",
        f"All arguments that differ from the defaults are in `{RUN_ARGS_FILE}` next to this card:", "",
        "```bash", f"python run_mlm.py {os.path.join(output_dir, RUN_ARGS_FILE)} --output_dir NEW_DIR", "```", "",
        "(With the same `--output_dir`, the run would resume from its last checkpoint instead.)", "",
        "The command that was run:", "", "```bash", f"{launcher()}run_mlm.py {redacted_command(argv)}", "```", "",
        "## Framework versions", "",
        f"- transformers {transformers.__version__}, torch {torch.__version__}, datasets {datasets.__version__}, "
        f"tokenizers {tokenizers.__version__}", "",
    ]
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
