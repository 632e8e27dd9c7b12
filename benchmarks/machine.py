"""The machine a figure comes from, recorded with every benchmark result."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# Process-wide settings that change every engine's speed or memory (huge pages, a preloaded
# allocator or OpenMP, oneDNN's primitive cache): recorded so that figures taken with and
# without them are not mixed.
SPEED_SETTINGS = ("GLIBC_TUNABLES", "LD_PRELOAD", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


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
        info["torch"] = torch.__version__
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
    return (f"{machine['processor']}, {machine['cpu_count']} cores, torch {machine.get('torch')}"
            + "".join(f", {k}={machine[k]}" for k in SPEED_SETTINGS if k in machine))


def write_results(payload: dict, md: str, json_path: Path | None, md_path: Path | None) -> None:
    """Print the markdown; write the JSON and the markdown where asked."""
    print(md)
    for path, text in ((json_path, json.dumps(payload, indent=2) + "\n"), (md_path, md)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
