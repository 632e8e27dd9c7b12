"""Is a model directory usable before it is loaded? Its safetensors files must be whole
(a header that covers the whole file) and match what config.json describes.

transformers alone would not say so clearly: a damaged file raises a bare
SafetensorError, and missing or extra decoder layers only log a warning and leave
randomly initialised weights behind, which training would then silently start from."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Shapes = dict[str, tuple[int, ...]]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def file_shapes(path: Path) -> Shapes:
    """Tensor name -> shape from a safetensors header (reads no tensor data). Raises
    ValueError naming the file if it is truncated or not a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # SafetensorError derives from Exception only
        raise ValueError(f"{path} is truncated or corrupt, not a readable safetensors file "
                         f"({_first_line(exc)})") from None


def model_shapes(model: torch.nn.Module) -> Shapes:
    """State-dict shapes of a model, each tied tensor once (under its first name), since
    a checkpoint may store tied embeddings only once."""
    seen, shapes = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = tuple(tensor.shape)
    return shapes


def config_shapes(model_dir: Path) -> tuple[Shapes, dict]:
    """(shapes, config dict) of the model config.json describes, built on the meta device
    (no memory, no initialisation). Raises ValueError naming config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_dir / "config.json"
    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # invalid JSON, unknown model_type, inconsistent sizes
        raise ValueError(f"{path} does not describe a buildable model ({_first_line(exc)})") from None
    return model_shapes(model), config.to_dict()


# Config fields read off the weights of Llama/Qwen2: (tensor, dimension).
_SIZE_FIELDS = {"vocab_size": ("model.embed_tokens.weight", 0),
                "hidden_size": ("model.embed_tokens.weight", 1),
                "intermediate_size": ("model.layers.0.mlp.up_proj.weight", 0)}


def _layer_count(names) -> int:
    found = [int(m.group(1)) for m in map(_LAYER.search, names) if m]
    return max(found) + 1 if found else 0


def describe_mismatch(expected: Shapes, found: Shapes, config: dict | None = None) -> str | None:
    """What the weights `found` lack or hold differently from the model `expected`
    (built from `config`), in one phrase naming the config field where one is to blame,
    or None if they fit. Extra non-layer tensors (a stored copy of tied embeddings,
    legacy rotary buffers) are allowed, as transformers ignores them."""
    want_layers, have_layers = _layer_count(expected), _layer_count(found)
    if want_layers != have_layers:
        return f"num_hidden_layers is {want_layers} in the config, the weights hold {have_layers} layers"
    for field, (name, dim) in _SIZE_FIELDS.items():
        value = (config or {}).get(field)
        if name in found and isinstance(value, int) and found[name][dim] != value:
            return f"{field} is {value} in the config, {found[name][dim]} in the weights ({name})"
    for name, shape in expected.items():
        if name in found and found[name] != shape:
            return (f"{name} has shape {list(found[name])} in the weights but "
                    f"{list(shape)} per the config")
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"the weights lack {missing[0]}{more}"
    return None


def check_model_files(model_dir: Path) -> None:
    """Raise ValueError (naming the files) unless model_dir's safetensors weights are
    readable and fit its config.json."""
    files = sorted(model_dir.glob("*.safetensors"))  # one file or the shards of one model
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors weights")
    found: Shapes = {}
    for path in files:
        found.update(file_shapes(path))
    expected, config = config_shapes(model_dir)
    problem = describe_mismatch(expected, found, config)
    if problem:
        weights = files[0] if len(files) == 1 else model_dir / "*.safetensors"
        raise ValueError(f"{model_dir / 'config.json'} does not match {weights}: {problem}")
