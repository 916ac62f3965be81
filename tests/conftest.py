"""Shared fixtures: an offline, isolated Hugging Face home, generated corpora and tiny-model arguments."""

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub or datasets: no network, and caches that start
# empty so that a test never passes because of something a previous run left behind.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="run_mlm_tests_hf_")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A toy grammar over ~60 tokens. A 2-layer, 32-wide BERT goes from uniform (ln 120 = 4.8
# nats) to the unigram entropy of this text (3.9 nats) in a few dozen steps, so "the loss
# falls" is a real check that takes seconds. (Learning the context takes post-LN BERTs
# hundreds of steps more: the well-known plateau.)
_SUBJECTS = ["the cat", "the dog", "a bird", "the old man", "my sister", "the teacher", "a small child"]
_VERBS = ["sees", "likes", "follows", "paints", "finds", "calls"]
_OBJECTS = ["the red ball", "a green tree", "the river", "a tall house", "the blue sky", "an apple"]
_ENDINGS = ["every morning .", "in the park .", "after school .", "with great care .", "near the lake ."]


def write_repetitive_corpus(path: Path, n_lines: int = 1200, seed: int = 0) -> Path:
    """Write `n_lines` generated sentences, one per line."""
    rng = random.Random(seed)
    lines = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        for _ in range(n_lines)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_repetitive_corpus(tmp_path_factory.mktemp("corpus") / "train.txt")


TINY_MODEL = [
    "--model_type", "bert",
    "--config_overrides",
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64",
    "--tokenizer_vocab_size", "120",
]


def tiny_run_args(output_dir, train_file, *extra) -> list[str]:
    """Arguments of a quick from-scratch run on the tiny model (a few seconds on 2 CPU cores)."""
    return [
        *TINY_MODEL,
        "--train_file", str(train_file),
        "--max_seq_length", "32",
        "--do_train", "--do_eval",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "5e-3",
        "--warmup_steps", "5",
        "--max_steps", "60",
        "--logging_steps", "10",
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--seed", "0",
        # The same numbers on every CI machine, whether or not its CPU has bf16 units.
        "--precision", "fp32",
        # transformers' defaults for what the flags above leave unset (15% masking, linear
        # schedule, dropout 0.1), so that these runs' numbers do not move with the
        # from-scratch recipe; tests/test_recipe.py and tests/test_budget.py run the recipe.
        "--scratch_recipe", "false",
        *extra,
    ]


def accelerate_launch(config: str, args: list[str], launcher_args: list[str] = (), env: dict | None = None,
                      timeout: int = 600, wait: bool = True, script: str | None = None):
    """`accelerate launch --config_file <config> [launcher_args] run_mlm.py <args>` as a subprocess.

    `script`: another script or, with launcher_args ["-m"], a module (utils.tools.downstream).
    With wait=False, returns the Popen (for launches that must run side by side).
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
               *launcher_args, script or str(REPO / "run_mlm.py"), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
