"""Benchmark prompts from a deterministic held-out split of the installed Python source.

The split is defined by hashing each file's path relative to the standard-library root, so
it is the same on every machine with the same Python version and never depends on file
order. `training_files()` lists the complement; the reference model is trained only on it.

Two prompt sets:
- ``code``: prefixes of held-out source files, cut at a line end (the model continues code);
- ``nl``: natural-language prompts: the opening of a held-out docstring or comment block.
"""
from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from pathlib import Path

HELDOUT_PERCENT = 10          # share of files held out, by path hash
PROMPT_SETS = ("code", "nl")
_SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _bucket(rel_path: str) -> int:
    return int(hashlib.sha256(rel_path.encode()).hexdigest(), 16) % 100


def is_heldout(rel_path: str) -> bool:
    """True for files in the held-out split (``rel_path`` is POSIX, relative to the root)."""
    return _bucket(rel_path) < HELDOUT_PERCENT


def source_files(root: Path | None = None) -> list[Path]:
    """All usable .py files under the stdlib root (tests and vendored packages excluded)."""
    root = Path(root) if root else stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_PARTS)
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            p = Path(dirpath) / name
            try:
                if p.stat().st_size < 200:
                    continue
            except OSError:
                continue
            out.append(p)
    return sorted(out)


def _split(heldout: bool, root: Path | None) -> list[Path]:
    root = Path(root) if root else stdlib_root()
    return [p for p in source_files(root) if is_heldout(p.relative_to(root).as_posix()) == heldout]


def training_files(root: Path | None = None) -> list[Path]:
    """Files the reference model may train on (the held-out split removed)."""
    return _split(False, root)


def heldout_files(root: Path | None = None) -> list[Path]:
    return _split(True, root)


def _read(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _code_prefix(text: str, max_chars: int) -> str | None:
    """Cut a file after its first ~max_chars characters, at a line end, skipping the header."""
    lines = text.splitlines(keepends=True)
    start = 0
    # Skip the module docstring / licence header: start at the first def/class/import line.
    for i, line in enumerate(lines):
        if line.startswith(("def ", "class ", "import ", "from ")):
            start = i
            break
    body = "".join(lines[start:])
    if len(body) < max_chars + 200:
        return None
    cut = body.rfind("\n", 0, max_chars)
    return body[: cut + 1] if cut > max_chars // 2 else None


def _nl_prompts(text: str, max_chars: int) -> list[str]:
    """Openings of docstrings (function/class) and of multi-line comment blocks."""
    out = []
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 2 * max_chars // 3:
                    words = doc[:max_chars].rsplit(" ", 1)[0]
                    out.append(f'"""{words}')
    lines = text.splitlines()
    block: list[str] = []
    for line in lines + [""]:
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!") and len(s) > 3:
            block.append(s)
            continue
        if len(block) >= 3:
            joined = "\n".join(block)
            if len(joined) > 2 * max_chars // 3:
                out.append(joined[:max_chars].rsplit(" ", 1)[0])
        block = []
    return out


def load_prompts(kind: str, n: int, max_chars: int = 600, root: Path | None = None) -> list[str]:
    """``n`` deterministic prompts of the given kind ("code" or "nl") from held-out files."""
    if kind not in PROMPT_SETS:
        raise ValueError(f"prompt set must be one of {', '.join(PROMPT_SETS)}, got {kind!r}")
    prompts: list[str] = []
    for p in heldout_files(root):
        text = _read(p)
        if not text:
            continue
        if kind == "code":
            pre = _code_prefix(text, max_chars)
            if pre:
                prompts.append(pre)
        else:
            prompts.extend(_nl_prompts(text, max_chars)[:2])
        if len(prompts) >= n:
            break
    if not prompts:
        raise RuntimeError(f"no held-out {kind} prompts found under {root or stdlib_root()}")
    # Not enough distinct files: repeat (a batch of B always has B prompts).
    return [prompts[i % len(prompts)] for i in range(n)]
