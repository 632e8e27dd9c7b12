"""Export a trained checkpoint for shipping: bf16 safetensors in small shards, the config
with its `layerskip` metadata, the tokenizer; nothing of the optimizer or the run.

    python -m training.export --model DIR --output DIR [--dtype bfloat16] [--max-shard-mib 15]

Small shards keep each file under a repository's size limits and let a clone fetch them in
parallel. The output is written to a temporary directory beside --output and renamed into
place at the end, so an interrupted export leaves no half-written model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .cli import run_cli
from .errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export(model_dir: Path, output: Path, dtype: str = "bfloat16", max_shard_mib: int = 15,
           overwrite: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if max_shard_mib < 1:
        raise ConfigError(f"--max-shard-mib must be >= 1, got {max_shard_mib}")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model: {model_dir} has no config.json (not a Hugging Face checkpoint)")
    if output.exists() and not overwrite:
        raise ConfigError(f"--output: {output} exists (pass --overwrite to replace it)")
    config = json.loads((model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_mib << 20, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        saved = json.loads((tmp / "config.json").read_text())
        if "layerskip" in config:  # save_pretrained keeps unknown keys, but be explicit
            saved["layerskip"] = config["layerskip"]
        (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        too_big = [p.name for p in tmp.glob("*.safetensors")
                   if p.stat().st_size > max_shard_mib * (1 << 20) * 1.05]
        if too_big:  # a single tensor larger than the shard size cannot be split
            raise ConfigError(f"--max-shard-mib {max_shard_mib}: {', '.join(too_big)} holds a "
                              f"tensor larger than that; raise the limit")
        # mkdtemp's directory (and safetensors' files) are private to the owner; a shipped
        # model is read by everyone, as files the user would have created.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--max-shard-mib", type=int, default=15)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = export(args.model, args.output, args.dtype, args.max_shard_mib, args.overwrite)
    files = sorted(out.iterdir())
    print(f"wrote {out}: " + ", ".join(f"{f.name} ({f.stat().st_size / (1 << 20):.1f} MiB)"
                                       for f in files if f.suffix == ".safetensors"))


if __name__ == "__main__":
    run_cli(main)
