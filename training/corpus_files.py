"""Which Python files the code corpus holds: the standard library and the running
environment's site-packages, filtered, deduplicated, with the benchmark held-out split
removed.

Held-out rule (the split `benchmarks/prompts.py` defines): a standard-library file whose
path relative to the stdlib root hashes into the held-out bucket (`is_heldout`) never
enters the corpus, whatever its directory (a superset of the files the benchmark prompts
come from). A site-packages file whose content is byte-identical to such a held-out file
(a vendored copy) is dropped too, so held-out code cannot leak in through another path.
Deduplication keeps the first file of each content hash, stdlib first.
"""
from __future__ import annotations

import hashlib
import os
import site
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from benchmarks.prompts import is_heldout

MIN_BYTES = 200            # smaller files are mostly `__init__.py` stubs
MAX_BYTES = 256 * 1024     # larger ones are mostly generated tables and bindings
MAX_LINE_CHARS = 2000      # a longer line means data or minified/generated code
MAX_MEAN_LINE_CHARS = 100  # idem, on average
SKIP_DIRS = {"__pycache__", ".git", "site-packages", "dist-packages"}


@dataclass(frozen=True)
class SourceFile:
    path: Path
    origin: str   # "stdlib" | "site-packages"
    sha256: str
    text: str


@dataclass
class Selection:
    files: list[SourceFile] = field(default_factory=list)
    heldout_drops: int = 0      # held-out stdlib files and vendored copies of them
    vendored_drops: int = 0     # of which: site-packages copies of held-out files
    duplicate_drops: int = 0    # identical content seen before
    filtered_drops: int = 0     # size, encoding, generated-looking


def default_roots() -> tuple[Path, list[Path]]:
    """(stdlib root, site-packages dirs of the running interpreter's environment)."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    sites: dict[Path, None] = {}
    for p in [paths["purelib"], paths["platlib"], *site.getsitepackages()]:
        rp = Path(p).resolve()
        if rp.is_dir():
            sites[rp] = None
    return stdlib, list(sites)


def walk_py(root: Path, skip_dirs: set[str] = SKIP_DIRS) -> Iterator[Path]:
    """.py files under root in a fixed order; nested site-packages (the base interpreter's,
    inside the stdlib root) are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def looks_usable(data: bytes) -> str | None:
    """The text of a file the corpus should keep, or None (size, encoding, generated)."""
    if not MIN_BYTES <= len(data) <= MAX_BYTES:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.splitlines() or [""]
    if max(map(len, lines)) > MAX_LINE_CHARS or len(text) / len(lines) > MAX_MEAN_LINE_CHARS:
        return None
    return text


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def heldout_hashes(stdlib: Path) -> set[str]:
    """Content hashes of every held-out stdlib file, filtered or not (their copies anywhere
    must stay out)."""
    out = set()
    for path in walk_py(stdlib):
        if is_heldout(path.relative_to(stdlib).as_posix()):
            data = _read(path)
            if data is not None:
                out.add(sha256_bytes(data))
    return out


def _candidates(stdlib: Path, sites: Iterable[Path]) -> Iterator[tuple[Path, str, bool]]:
    """(path, origin, held out by path) for every .py file, stdlib first."""
    for path in walk_py(stdlib):
        yield path, "stdlib", is_heldout(path.relative_to(stdlib).as_posix())
    for root in sites:
        for path in walk_py(root, SKIP_DIRS - {"site-packages", "dist-packages"}):
            yield path, "site-packages", False


def select_files(stdlib: Path, sites: Iterable[Path]) -> Selection:
    """The corpus files: held-out split and its copies removed, filtered, deduplicated."""
    banned = heldout_hashes(stdlib)
    seen: set[str] = set()
    sel = Selection()
    for path, origin, heldout in _candidates(stdlib, sites):
        if heldout:
            sel.heldout_drops += 1
            continue
        data = _read(path)
        if data is None:
            sel.filtered_drops += 1
            continue
        text = looks_usable(data)  # first: copies of held-out stubs count as filtered
        if text is None:
            sel.filtered_drops += 1
            continue
        digest = sha256_bytes(data)
        if digest in banned:
            sel.heldout_drops += 1
            sel.vendored_drops += 1
            continue
        if digest in seen:
            sel.duplicate_drops += 1
            continue
        seen.add(digest)
        sel.files.append(SourceFile(path, origin, digest, text))
    return sel


def corpus_order(files: list[SourceFile]) -> list[SourceFile]:
    """stdlib first (closest to the benchmark's domain, kept whole under a token cap),
    then site-packages in content-hash order: a cap then takes a mix of packages, not the
    alphabetically first ones."""
    std = [f for f in files if f.origin == "stdlib"]
    rest = sorted((f for f in files if f.origin != "stdlib"), key=lambda f: f.sha256)
    return std + rest


def stream_order(files: list[SourceFile]) -> list[SourceFile]:
    """Documents in the token stream in content-hash order, so that the held-out tail the
    trainer takes for calibration is a random mix of stdlib and packages."""
    return sorted(files, key=lambda f: f.sha256)
