"""How the code hangs together: no import cycles, a library that does not need the script, tools that run from
any directory, and no process-wide changes on import or in an in-process run."""

import ast
import json
import logging
import os
import re
import subprocess
import sys

from .conftest import REPO, tiny_run_args

UTILS = REPO / "utils"
# The tool whose arguments are run_mlm.py's own (a prepared dataset is what that run would tokenize).
SCRIPT_USERS = {"tools.prepare_dataset"}
PACKAGES = ("data", "model", "train", "tools")


def imported_modules(path) -> set[str]:
    """Modules a file imports anywhere in it (top level or inside functions): utils.train.xla as "train.xla",
    run_mlm as is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "utils" or node.module in {f"utils.{p}" for p in PACKAGES}:
                prefix = node.module.removeprefix("utils").removeprefix(".")
                names |= {f"{prefix}.{alias.name}" if prefix else alias.name for alias in node.names}
            elif node.module.startswith("utils."):
                names.add(node.module.removeprefix("utils."))
            elif node.module == "run_mlm":
                names.add("run_mlm")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("utils."):
                    names.add(alias.name.removeprefix("utils."))
                elif alias.name == "run_mlm":
                    names.add("run_mlm")
    return names


def utils_modules() -> dict:
    """{"train.xla": path, ...} for every module under utils/ (packages' __init__ aside)."""
    return {".".join(p.relative_to(UTILS).with_suffix("").parts): p for p in sorted(UTILS.rglob("*.py"))
            if p.stem != "__init__"}


def test_utils_modules_import_no_cycle_and_not_the_script():
    modules = {name: imported_modules(path) - {name} for name, path in utils_modules().items()}
    users = {name for name, imports in modules.items() if "run_mlm" in imports}
    assert users <= SCRIPT_USERS, f"library modules import run_mlm.py: {users - SCRIPT_USERS}"
    # Depth-first search for a cycle in the import graph (lazy imports included).
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for other in sorted(modules.get(name, set()) & set(modules)):
            assert state.get(other) != "open", f"import cycle: {' -> '.join([*path, name, other])}"
            if other not in state:
                visit(other, [*path, name])
        state[name] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [])


IMPORT_EVERYTHING = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
# The libraries first: what they set on import themselves (torch sets TORCHINDUCTOR_CACHE_DIR) is theirs.
import accelerate, datasets, torch, transformers
from transformers import Trainer
before = dict(os.environ), {{s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}}
import run_mlm
import importlib, pkgutil, utils
for info in pkgutil.walk_packages(utils.__path__, "utils."):
    importlib.import_module(info.name)
after = dict(os.environ), {{s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}}
print(json.dumps({{"env_same": before[0] == after[0], "signals_same": before[1] == after[1],
                  "pyplot_imported": "matplotlib.pyplot" in sys.modules}}))
"""


def test_importing_changes_nothing_process_wide():
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING.format(repo=str(REPO))], capture_output=True,
                         text=True, check=True, env={k: v for k, v in os.environ.items() if k != "HF_TOKEN"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"env_same": True, "signals_same": True,
                                                               "pyplot_imported": False}


def test_an_in_process_run_leaves_the_environment_and_the_allocator_alone(corpus, tmp_path, monkeypatch, caplog):
    from run_mlm import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = dict(os.environ)
    with caplog.at_level(logging.INFO):
        main(tiny_run_args(tmp_path / "out", corpus, "--max_steps", "2", "--hub_token", "hf_NotKeptAfter"))
    assert dict(os.environ) == before  # HF_TOKEN was set for the run only
    assert "malloc keeps freed memory" not in caplog.text  # process-wide: the script's choice only
    assert "CPU: " in caplog.text  # the model's own CPU kernels were still used


def test_the_script_turns_on_malloc_reuse(corpus, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "run_mlm.py"),
                             *tiny_run_args(tmp_path / "out", corpus, "--max_steps", "2")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if sys.platform.startswith("linux"):
        assert "CPU: malloc keeps freed memory for reuse" in result.stdout + result.stderr


def test_prepare_dataset_runs_by_path_from_any_directory_and_its_log_shows(corpus, tmp_path):
    data = tmp_path / "data"
    args = tiny_run_args(tmp_path / "unused", corpus, "--validation_split_percentage", "10",
                         "--tokenized_dataset_path", str(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, str(UTILS / "tools" / "prepare_dataset.py"), *args], cwd=elsewhere,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Prepared {data}: train" in result.stdout
    prepare_log = result.stdout + result.stderr
    # Training from it, the script logs what it read (the prepared-data logger is one setup_logging sets up).
    train = tiny_run_args(tmp_path / "out", corpus, "--max_steps", "2", "--tokenized_dataset_path", str(data))
    train[train.index("--train_file"): train.index("--train_file") + 2] = []
    result = subprocess.run([sys.executable, str(REPO / "run_mlm.py"), *train], cwd=elsewhere, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Prepared data {data}: train" in result.stdout + result.stderr
    # Both scripts stamp their lines the same way (HH:MM:SS LEVEL logger: ...), issue #31.
    stamp = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) utils\.[\w.]+: ")
    assert any(stamp.match(line) for line in prepare_log.splitlines()), prepare_log[-2000:]
    assert not re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", prepare_log, re.M)
    assert any(stamp.match(line) for line in result.stdout.splitlines() if "Prepared data" in line)


def test_no_posix_only_module_is_imported():
    """fcntl exists on Linux and macOS only: `import utils.train.checkpoints` must work on Windows too (filelock)."""
    users = [p.name for p in [*UTILS.rglob("*.py"), REPO / "run_mlm.py"]
             if any(isinstance(node, (ast.Import, ast.ImportFrom))
                    and "fcntl" in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])
                    for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))))]
    assert users == []


def test_every_module_says_its_one_concern_in_a_line_and_the_packages_are_the_architecture():
    """The tree reads as the architecture: utils/{data,model,train,tools}/ and a few shared modules, each module's
    docstring opening with the one thing it is for (the README's layout lists these lines)."""
    modules = utils_modules()
    top = {name for name in modules if "." not in name}
    assert top == {"args", "backend", "errors", "logs"}, top
    assert {name.split(".")[0] for name in modules} == {*top, *PACKAGES}
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name, path in modules.items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"utils/{name} has no docstring"
        assert f"{name.split('.')[-1]}.py" in readme, f"the README's layout does not list utils/{name}"
    for package in PACKAGES:
        assert ast.get_docstring(ast.parse((UTILS / package / "__init__.py").read_text(encoding="utf-8")))
