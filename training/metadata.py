"""LayerSkip metadata in a checkpoint's config.json, under the key "layerskip":

    {"exit_layer": int, "num_speculative_tokens": int, "recipe": {...},
     "calibration": {"agreement": [...], "expected_speedup": {...}, ...}}

The vLLM plugin reads exit_layer and num_speculative_tokens as its defaults."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

KEY = "layerskip"


def read_layerskip_metadata(model_dir: str | os.PathLike) -> dict | None:
    """The "layerskip" dict of model_dir/config.json, or None if absent."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get(KEY)
    return value if isinstance(value, dict) else None


def write_layerskip_metadata(model_dir: str | os.PathLike, updates: dict) -> dict:
    """Merge `updates` into config.json's "layerskip" dict (top-level keys replaced) and
    write atomically (temp file in the same directory, then os.replace). Returns it."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    merged = {**(config.get(KEY) or {}), **updates}
    config[KEY] = merged
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, path.stat().st_mode & 0o777)  # mkstemp's file is owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return merged
