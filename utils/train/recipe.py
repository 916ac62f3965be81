"""The from-scratch recipe: the settings a from-scratch run takes when the user does not give them.

transformers' defaults (learning rate 5e-5, no warm-up, dropout 0.1, 15% masking) are
fine-tuning defaults: a model trained from scratch with them stays on the unigram plateau
(predicting "the" and "." everywhere) for a long time. The values here were chosen by
measurement at equal wall-clock on held-out text (bench/time_to_quality.py, bench/RESULTS.md,
"Time to quality"). Each applies only when the user set neither the flag (on the command
line or in the args file) nor, for dropout, a dropout field in --config_overrides; a run
that adapts a pretrained checkpoint keeps the user's and transformers' settings.
`--scratch_recipe false` turns them all off.
"""

from __future__ import annotations

# flag -> (value, why): TrainingArguments / DataTrainingArguments fields.
FROM_SCRATCH = {
    "learning_rate": (5e-4, "1e-3 and 2e-3 trained worse at equal time"),
    "warmup_steps": (0.06, "6% of the steps, or of the time budget"),
    "lr_scheduler_type": ("warmup_stable_decay", "hold the peak rate, then decay over the last 20%"),
    "lr_scheduler_kwargs": ({"num_decay_steps": 0.2, "decay_type": "1-sqrt"}, "1-sqrt decay"),
    "mlm_probability": (0.3, "30% of tokens predicted in training; evaluation stays at 15%"),
}
DROPOUT_OFF = True  # from scratch: no dropout (one pass over the text rarely overfits; dropout slows learning)

# Dropout fields of the masked-LM families (ModernBERT's are 0 already).
# (Not the classifier's: fine-tuning a downstream head keeps its own.)
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                  "embedding_dropout", "mlp_dropout")


def apply_scratch_recipe(data_args, training_args, given: set[str]) -> list[str]:
    """Set the recipe's values the user did not give; returns "name value (why)" for the log."""
    applied = []
    for name, (value, why) in FROM_SCRATCH.items():
        if name in given or (name == "warmup_steps" and "warmup_ratio" in given):
            continue
        if name == "lr_scheduler_kwargs" and "lr_scheduler_type" in given:
            continue  # the user's schedule, with its own arguments
        target = data_args if hasattr(data_args, name) else training_args
        setattr(target, name, dict(value) if isinstance(value, dict) else value)
        applied.append(f"{name} {_show(value)} ({why})")
    return applied


def turn_dropout_off(config, config_overrides: str | None) -> list[str]:
    """Set the config's dropout rates to 0, except those the user set in --config_overrides."""
    if not DROPOUT_OFF:
        return []
    set_by_user = {pair.split("=", 1)[0].strip() for pair in (config_overrides or "").split(",") if "=" in pair}
    changed = []
    for name in DROPOUT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, float) and value > 0 and name not in set_by_user:
            setattr(config, name, 0.0)
            changed.append(name)
    return changed


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items())
    return str(value)


def describe() -> str:
    return "; ".join([f"{name} {_show(value)}" for name, (value, _) in FROM_SCRATCH.items()]
                     + (["dropout 0"] if DROPOUT_OFF else []))
