"""A pre-tokenized corpus directory: the tokenizer, the token stream and its manifest.

    DIR/tokenizer.json ...   the byte-level BPE tokenizer (transformers fast tokenizer files)
    DIR/tokens.u16.xz        every document's ids, joined with EOS: little-endian uint16, xz
    DIR/corpus.json          counts, and the sha256 of tokens.u16.xz and of its raw ids

uint16 holds any vocabulary up to 65,536 ids and xz (standard library lzma) shrinks code
tokens a further ~40 %, so a corpus of tens of millions of tokens travels in well under
64 MiB. Both hashes are checked on load: a truncated or altered file is refused with the
flag's name instead of training on garbage."""
from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

TOKENS_FILE = "tokens.u16.xz"
MANIFEST_FILE = "corpus.json"
MAX_VOCAB = 1 << 16
XZ_PRESET = 6


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tokens(directory: Path, ids: np.ndarray) -> dict:
    """Write the uint16 stream compressed; returns its manifest fields."""
    if ids.dtype != np.uint16:
        raise ValueError(f"token ids must be uint16, got {ids.dtype}")
    raw = ids.astype("<u2", copy=False).tobytes()
    path = Path(directory) / TOKENS_FILE
    tmp = path.with_name(path.name + ".tmp")
    with lzma.open(tmp, "wb", preset=XZ_PRESET) as f:
        f.write(raw)
    tmp.replace(path)
    return {"tokens": int(ids.size), "tokens_file": TOKENS_FILE,
            "tokens_file_bytes": path.stat().st_size, "tokens_file_sha256": sha256_file(path),
            "tokens_sha256": hashlib.sha256(raw).hexdigest()}


def write_manifest(directory: Path, manifest: dict) -> None:
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: Path, flag: str = "--tokens") -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not Path(directory).is_dir():
        raise DataError(f"{flag}: {directory} is not a directory (expected the output of "
                        f"python -m training.corpus)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{flag}: {directory} has no {MANIFEST_FILE} (expected the output of "
                        f"python -m training.corpus)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{flag}: cannot read {path}: {exc}") from None
    needed = {"tokens", "tokens_file_sha256", "tokens_sha256", "vocab_size"}
    if not isinstance(manifest, dict) or not needed <= manifest.keys():
        raise DataError(f"{flag}: {path} lacks {', '.join(sorted(needed))}")
    return manifest


def read_tokens(directory: Path, flag: str = "--tokens") -> torch.Tensor:
    """The verified token stream, [n] int32 (int32: a quarter of int64's memory; ids are
    widened per batch)."""
    manifest = read_manifest(directory, flag)
    path = Path(directory) / TOKENS_FILE
    if not path.is_file():
        raise DataError(f"{flag}: {path} is missing")
    if sha256_file(path) != manifest["tokens_file_sha256"]:
        raise DataError(f"{flag}: {path} is corrupt (sha256 differs from {MANIFEST_FILE})")
    try:
        with lzma.open(path, "rb") as f:
            raw = f.read()
    except (OSError, lzma.LZMAError, EOFError) as exc:
        raise DataError(f"{flag}: cannot decompress {path}: {exc}") from None
    if len(raw) != 2 * manifest["tokens"] or hashlib.sha256(raw).hexdigest() != manifest["tokens_sha256"]:
        raise DataError(f"{flag}: {path} does not hold the {manifest['tokens']} tokens {MANIFEST_FILE} names")
    ids = np.frombuffer(raw, dtype="<u2")
    if ids.size and int(ids.max()) >= manifest["vocab_size"]:
        raise DataError(f"{flag}: {path} holds id {int(ids.max())} >= vocab size {manifest['vocab_size']}")
    return torch.from_numpy(ids.astype(np.int32))  # [n]


def load_tokenizer(directory: Path, flag: str = "--tokens"):
    from transformers import AutoTokenizer

    if not (Path(directory) / "tokenizer.json").is_file():
        raise DataError(f"{flag}: {directory} has no tokenizer.json")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise DataError(f"{flag}: cannot load the tokenizer in {directory}: "
                        f"{str(exc).splitlines()[0]}") from None


def load_token_corpus(directory: str, flag: str = "--tokens") -> tuple[object, torch.Tensor]:
    """(tokenizer, [n] int32 stream) of a corpus directory, both checked."""
    manifest = read_manifest(Path(directory), flag)
    tokenizer = load_tokenizer(Path(directory), flag)
    if len(tokenizer) != manifest["vocab_size"]:
        raise DataError(f"{flag}: the tokenizer has {len(tokenizer)} entries, "
                        f"{MANIFEST_FILE} says {manifest['vocab_size']}")
    return tokenizer, read_tokens(Path(directory), flag)
