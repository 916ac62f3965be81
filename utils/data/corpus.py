"""Corpora built at run time from text already on the machine.

The quickstart and the tests must train on real English with no network and without
shipping anyone's text in the repository. Every Python installation carries a few MB
of English prose in the docstrings of its standard library, so we gather it from the
source files (parsed with `ast`, never imported: importing `antigravity` opens a
browser, `this` prints a poem).
"""

from __future__ import annotations

import ast
import os
import re
import sys
import sysconfig
from pathlib import Path

BUILTIN_CORPORA = ("python_docstrings",)

# Directories of the standard library that hold test fixtures, vendored code or demos
# rather than documentation prose.
_SKIPPED_DIRS = {
    "__pycache__",
    "dist-packages",
    "ensurepip",
    "idle_test",
    "lib2to3",
    "site-packages",
    "test",
    "tests",
    "turtledemo",
}
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_WORD = re.compile(r"[A-Za-z]{2,}")


def run_cache_dir(cache_dir: str | None = None) -> Path:
    """Where this project caches what it builds (corpora, tokenizers): `cache_dir`, else `$HF_HOME/run_mlm`."""
    if cache_dir:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "run_mlm"


def _prose_paragraphs(docstring: str) -> list[str]:
    """Split a cleaned docstring into one-line paragraphs, dropping code and tables."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", docstring):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        # Doctest examples, indented code and option tables are not prose.
        if not lines or any(line.startswith((">>>", "...", "$ ", "|", "+-", "==")) for line in lines):
            continue
        text = " ".join(lines)
        words = _WORD.findall(text)
        # Keep paragraphs that read as sentences: a few words, mostly letters.
        if len(words) >= 4 and sum(map(len, words)) >= 0.6 * len(text):
            paragraphs.append(text)
    return paragraphs


def iter_python_docstrings(stdlib_dir: str | None = None):
    """Yield prose paragraphs from the docstrings of the standard library, in a fixed order."""
    for _, paragraph in iter_python_docstrings_by_file(stdlib_dir):
        yield paragraph


def iter_python_docstrings_by_file(stdlib_dir: str | None = None):
    """Yield (file path relative to the standard library, paragraph), in a fixed order."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            try:
                source = (Path(dirpath) / filename).read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are deliberately invalid (test data, Python 2 code)
            for node in ast.walk(tree):
                if isinstance(node, _DOCSTRING_OWNERS):
                    docstring = ast.get_docstring(node)
                    if docstring:
                        relative = (Path(dirpath) / filename).relative_to(root)
                        for paragraph in _prose_paragraphs(docstring):
                            yield relative, paragraph


def build_corpus(name: str, cache_dir: str | None = None) -> Path:
    """Write the named builtin corpus as a text file (one paragraph per line) and return its path.

    The file is keyed on the Python version, built once and reused; it is written to a
    temporary name and renamed so that a concurrent or killed build never leaves half a file.
    """
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown builtin corpus {name!r}; choose one of {', '.join(BUILTIN_CORPORA)}")
    directory = run_cache_dir(cache_dir) / "corpora"
    version = ".".join(map(str, sys.version_info[:3]))
    path = directory / f"{name}-py{version}.txt"
    if path.exists() and path.stat().st_size > 0:
        return path
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for paragraph in iter_python_docstrings():
            f.write(paragraph + "\n")
    os.replace(tmp, path)
    return path


LABELLED_TASKS = ("python_packages",)


def build_labelled_task(name: str, cache_dir: str | None = None, n_labels: int = 4,
                        per_label: int = 300) -> dict[str, list[str]]:
    """A labelled task from this machine's standard library: which package a docstring paragraph comes from.

    The `n_labels` packages with the most paragraphs, `per_label` paragraphs each (fewer if a
    package has fewer), a fifth of each held out for validation (by a hash of the text, so
    the split does not depend on order). Written once per Python version as csv files
    (text,label); returns {"train": [path], "validation": [path]}.
    """
    import csv
    import hashlib
    from collections import defaultdict

    if name not in LABELLED_TASKS:
        raise ValueError(f"unknown builtin task {name!r}; choose one of {', '.join(LABELLED_TASKS)}")
    directory = run_cache_dir(cache_dir) / "tasks" / f"{name}-py{'.'.join(map(str, sys.version_info[:3]))}"
    paths = {split: directory / f"{split}.csv" for split in ("train", "validation")}
    if all(p.exists() for p in paths.values()):
        return {split: [str(p)] for split, p in paths.items()}
    by_package: dict[str, list[str]] = defaultdict(list)
    for relative, paragraph in iter_python_docstrings_by_file():
        if len(relative.parts) > 1 and relative.parts[0] not in ("idlelib", "pydoc_data", "encodings"):
            by_package[relative.parts[0]].append(paragraph)
    packages = sorted(by_package, key=lambda p: (-len(set(by_package[p])), p))[:n_labels]
    rows = {"train": [], "validation": []}
    for package in sorted(packages):
        for paragraph in sorted(set(by_package[package]))[:per_label]:
            held_out = int(hashlib.sha1(paragraph.encode()).hexdigest(), 16) % 5 == 0
            rows["validation" if held_out else "train"].append((paragraph, package))
    directory.mkdir(parents=True, exist_ok=True)
    for split, path in paths.items():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows[split])
        os.replace(tmp, path)
    return {split: [str(p)] for split, p in paths.items()}
