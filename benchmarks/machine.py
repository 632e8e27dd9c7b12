"""The machine a figure comes from, recorded with every benchmark result."""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

# Process-wide settings that change every engine's speed or memory (huge pages, a preloaded
# allocator or OpenMP, oneDNN's primitive cache): recorded so that figures taken with and
# without them are not mixed.
SPEED_SETTINGS = ("GLIBC_TUNABLES", "LD_PRELOAD", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")

# The engines' --dtype. "auto" is bfloat16 where the hardware computes it (a GPU, or a CPU
# with AVX512_BF16 or AMX) and float32 elsewhere: without those instructions a bf16 matmul
# converts its operands on the fly. Measured on a 2-core AMD EPYC with AVX2 only
# (2026-12-07, shipped model, eager, plain vLLM): bf16 40.4 / 68.2 tokens/s at batch 1 / 8,
# float32 40.6 / 171.9.
DTYPES = ("auto", "bfloat16", "float32", "float16")


def engine_dtype(name: str = "auto") -> str:
    """`name`, with "auto" resolved for this machine (see DTYPES)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name != "auto":
        return name
    from training.hardware import native_bf16  # imports torch: not at every CLI's start
    return "bfloat16" if native_bf16() else "float32"


def add_dtype_flag(ap: argparse.ArgumentParser, default: str = "auto") -> None:
    """--dtype for a benchmark's engines; args.dtype holds the resolved name."""
    def parse(name: str) -> str:
        try:
            return engine_dtype(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    ap.add_argument("--dtype", default=default, type=parse, metavar="{" + ",".join(DTYPES) + "}",
                    help=f"the engines' dtype (default {default}; auto: bfloat16 where the CPU "
                         "computes it natively, AVX512_BF16 or AMX, float32 elsewhere)")


def machine_info() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["processor"] = names[0]
    except OSError:
        pass
    try:
        import torch

        from training.hardware import native_bf16
        info["torch"] = torch.__version__
        info["native_bf16"] = native_bf16()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    for name in SPEED_SETTINGS:
        if os.environ.get(name):
            info[name] = os.environ[name]
    return info


def describe(machine: dict) -> str:
    """One line: processor, cores, torch, and the speed settings in force."""
    bf16 = {True: ", native bf16", False: ", no native bf16"}.get(machine.get("native_bf16"), "")
    return (f"{machine['processor']}, {machine['cpu_count']} cores{bf16}, "
            f"torch {machine.get('torch')}"
            + "".join(f", {k}={machine[k]}" for k in SPEED_SETTINGS if k in machine))


def write_results(payload: dict, md: str, json_path: Path | None, md_path: Path | None,
                  echo: bool = True) -> None:
    """Print the markdown (if `echo`); write the JSON and the markdown where asked."""
    if echo:
        print(md)
    for path, text in ((json_path, json.dumps(payload, indent=2) + "\n"), (md_path, md)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
