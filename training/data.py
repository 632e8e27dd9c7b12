"""--data handling: expand paths, read documents, tokenize, pack into fixed-length blocks,
hold out a tail for calibration, and a pure, resumable batch order for (sharded) training."""
from __future__ import annotations

import glob
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import DataError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
JSONL_SUFFIX = ".jsonl"
SKIP_DIRS = {"__pycache__", "site-packages", ".git"}


def _walk(directory: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix in TEXT_SUFFIXES or path.suffix == JSONL_SUFFIX:
                yield path


def collect_files(paths: Iterable[str]) -> list[Path]:
    """Files named directly, directories read recursively, globs expanded; sorted, unique."""
    found: dict[Path, None] = {}
    for spec in paths:
        matches = [Path(spec)] if Path(spec).exists() else [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
        if not matches:
            raise DataError(f"--data: {spec} does not exist or matches no file")
        for m in matches:
            for f in (_walk(m) if m.is_dir() else [m]):
                found[f] = None
    if not found:
        raise DataError(f"--data: no .py/.txt/.md/.rst/.jsonl file found in {' '.join(paths)}")
    return list(found)


def read_documents(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        try:
            if path.suffix == JSONL_SUFFIX:
                for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
                    if line.strip():
                        record = json.loads(line)
                        text = record.get("text") if isinstance(record, dict) else None
                        if isinstance(text, str) and text:
                            yield text
            else:
                text = path.read_text(encoding="utf-8", errors="replace")
                if text:
                    yield text
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"--data: cannot read {path}: {exc}") from None


def load_texts(paths: Iterable[str]) -> list[str]:
    texts = list(read_documents(collect_files(paths)))
    if not any(t.strip() for t in texts):
        raise DataError(f"--data: the files in {' '.join(paths)} contain no text")
    return texts


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, cut into [n, seq_len] blocks (tail dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    return pack_stream(torch.tensor(stream, dtype=torch.long), seq_len, "--data")


def pack_stream(stream: torch.Tensor, seq_len: int, flag: str) -> torch.Tensor:
    """[N] ids (documents already joined with EOS) -> [n, seq_len] int64 blocks, tail
    dropped: the same packing for --data and for a pre-tokenized --tokens corpus."""
    n = len(stream) // seq_len
    if n < 2:
        raise DataError(f"{flag}: only {len(stream)} tokens, need at least {2 * seq_len} "
                        f"for --seq-len {seq_len} (training plus held-out)")
    return stream[: n * seq_len].long().view(n, seq_len)  # [n, s]


def split_heldout(blocks: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `fraction` of blocks (at least one) is held out for calibration."""
    n_held = max(1, int(round(len(blocks) * fraction)))
    n_held = min(n_held, len(blocks) - 1)
    return blocks[:-n_held], blocks[-n_held:]


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, seed: int, micro_step: int, batch_size: int,
                  world_size: int = 1, rank: int = 0) -> torch.Tensor:
    """Block indices of one micro-batch. Position p in the global stream (all ranks, all
    steps) maps to block perm_epoch[p mod n] with epoch = p // n, so the order is a pure
    function of the step: resuming needs only the step counter, and ranks get disjoint
    shards of every global batch (like DistributedSampler)."""
    start = (micro_step * world_size + rank) * batch_size
    pos = range(start, start + batch_size)
    return torch.stack([_epoch_permutation(n, seed, p // n)[p % n] for p in pos])
