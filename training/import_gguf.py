"""Turn a Llama or Qwen2 GGUF file (llama.cpp's format) into a Hugging Face model directory.

    python -m training.import_gguf --gguf FILE --output DIR [--dtype bfloat16] [--overwrite]

The output (config.json, model.safetensors, generation_config.json, tokenizer files) loads
unchanged in transformers and vLLM and can be fine-tuned with `training.finetune`.

transformers does the reading: it rebuilds the config and the tokenizer from the GGUF
metadata, dequantizes every tensor (Q4/Q8/F16/...) and undoes llama.cpp's rotary
permutation of the q/k projections. What it loads is a model tagged with a GGUF
quantization config, which `save_pretrained` refuses; its tensors are plain dense ones,
though, so this module writes them itself with the config entry dropped. A dequantized
model is exactly as good as the GGUF, not as the model the GGUF was quantized from.

The directory is written under a temp name next to --output and renamed into place
only once it is complete, its weights fit its config.json and its tokenizer encodes like
the GGUF's, so a failed or interrupted import leaves no half-written output."""
from __future__ import annotations

import argparse
import copy
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import TMP, WEIGHTS, _save_weights
from .cli import run_cli
from .errors import ModelError, OutputError, TrainingError
from .gguf_tokenizer import apply_tokenizer_flags, check_tokenizer, save_tokenizer
from .integrity import check_model_files, model_shapes
from .layerskip_model import SUPPORTED_ARCHITECTURES

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")  # general.architecture values
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.import_gguf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, metavar="FILE", help="a llama or qwen2 .gguf file")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="new Hugging Face model directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of the safetensors weights (default: bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return p.parse_args(argv)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _rope_scaling(reader, architecture: str) -> str | None:
    """What in the file scales the rotary embeddings, if anything. transformers' GGUF reader
    maps neither llama.cpp's rope_freqs tensor (Llama 3.1+ frequency factors) nor the
    *.rope.scaling.* entries into the config, so importing such a file would silently
    give a model with other rotary frequencies."""
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        return "rope frequency factors (tensor rope_freqs.weight, Llama 3.1+ rope scaling)"
    field = reader.fields.get(f"{architecture}.rope.scaling.type")
    kind = field.contents() if field is not None else None
    if kind not in (None, "none"):
        return f"rope scaling {kind!r} ({architecture}.rope.scaling.type)"
    return None


def _flag(reader, key: str) -> bool | None:
    field = reader.fields.get(key)
    return bool(field.contents()) if field is not None else None


def read_gguf_header(path: Path) -> tuple[str, dict[str, bool]]:
    """(general.architecture, tokenizer flags) of a GGUF file, after checking that it is
    one this import reproduces faithfully. Reading the metadata (the gguf package maps
    the file) costs no tensor data."""
    allowed = f"a GGUF model file of architecture {' or '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
    if not path.exists():
        raise ModelError(f"--gguf: {path} does not exist (expected {allowed})")
    if not path.is_file():
        raise ModelError(f"--gguf: {path} is not a file (expected {allowed})")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelError(f"--gguf: cannot read {path}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"--gguf: {path} is not a GGUF file (it does not start with the "
                         f"bytes 'GGUF'; expected {allowed})")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise TrainingError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
    except Exception as exc:  # truncated header, bad counts, unknown value types
        raise ModelError(f"--gguf: {path} is truncated or corrupt, not a readable GGUF file "
                         f"({_first_line(exc)})") from None
    if architecture is None:
        raise ModelError(f"--gguf: {path} has no general.architecture entry (expected {allowed})")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelError(f"--gguf: {path} has unsupported architecture {architecture!r} "
                         f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    scaling = _rope_scaling(reader, architecture)
    if scaling:
        raise ModelError(f"--gguf: {path} uses {scaling}, which transformers' GGUF reader "
                         f"drops; the imported model would not match the file")
    flags = {name: _flag(reader, f"tokenizer.ggml.{name}")
             for name in ("add_bos_token", "add_eos_token")}
    return architecture, {name: value for name, value in flags.items() if value is not None}


def check_output(output: Path, gguf: Path, overwrite: bool) -> None:
    """Refuse a non-empty --output unless --overwrite, and never let --overwrite delete
    the file being imported."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output: {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise OutputError(f"--output: {output} is not empty; pass --overwrite to replace it")
        if output.resolve() in gguf.resolve().parents:
            raise OutputError(f"--output: {output} holds the --gguf file, which --overwrite "
                              f"would delete; choose another directory")


def load_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) as transformers reads them from the GGUF, every weight dense."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:  # newer transformers keep quantized blocks packed unless told otherwise
        from transformers import GgufConfig
        quantization = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older ones always dequantize
        quantization = {}
    folder, name = str(path.parent), path.name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report; missing tensors are checked below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, output_loading_info=True, **quantization)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ModelError(f"--gguf: transformers cannot load {path}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:  # e.g. a llama file whose name says Mistral
        raise ModelError(f"--gguf: {path} loads as {arch} in transformers "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    # A tensor the file lacks would otherwise be left randomly initialised, silently.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"--gguf: {path} lacks the tensor for {missing[0]}{more}")
    return model, tokenizer


def plain_config(model):
    """The model's config as a plain checkpoint's: no GGUF quantization entry, and the
    architecture named (vLLM picks its model class from it)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    return config


def dense_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights, each tied tensor once under its first name (the embedding, not
    lm_head): config.tie_word_embeddings re-ties them on load in transformers and vLLM,
    and the embedding matrix is not stored twice."""
    state = model.state_dict()
    return {name: state[name] for name in model_shapes(model)}


def write_model_dir(tmp: Path, model, tokenizer, source: Path) -> None:
    """Everything into tmp, config.json last, then check the result as a user would load it."""
    tmp.mkdir(parents=True)
    _save_weights(dense_state_dict(model), tmp / WEIGHTS)
    save_tokenizer(tokenizer, tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    plain_config(model).save_pretrained(tmp)
    try:
        check_model_files(tmp)
    except ValueError as exc:  # a bug or an odd file, never publish it
        raise ModelError(f"--gguf: the weights imported from {source} do not fit their "
                         f"config: {exc}") from None
    check_tokenizer(tmp, tokenizer, source)


def publish(tmp: Path, output: Path) -> None:
    """Move the finished directory into place. An existing --output (empty, or to be
    overwritten) is renamed aside first and deleted only once the new one is in place."""
    old = output.with_name(f"{TMP}old-{output.name}-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    try:
        os.replace(tmp, output)
    except OSError:
        if old.exists():
            os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def import_gguf(gguf: str, output: str, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    path, out = Path(gguf), Path(output)
    architecture, tokenizer_flags = read_gguf_header(path)
    check_output(out, path, overwrite)
    model, tokenizer = load_gguf(path, DTYPES[dtype])
    apply_tokenizer_flags(tokenizer, tokenizer_flags)
    target = Path(os.path.abspath(out))  # "DIR/", "." and the like name a real entry
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{TMP}import-{target.name}-*"):  # a killed import's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f"{TMP}import-{target.name}-{os.getpid()}"
    try:
        write_model_dir(tmp, model, tokenizer, path)
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(t.numel() for t in dense_state_dict(model).values())
    print(f"wrote {out}: {type(model).__name__} ({architecture} GGUF), "
          f"{model.config.num_hidden_layers} layers, {params / 1e6:.1f}M parameters, {dtype}")
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    import_gguf(args.gguf, args.output, args.dtype, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
