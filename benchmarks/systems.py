"""How each benchmarked system is built.

vLLM systems are described by the keyword arguments of `vllm.LLM`; the Hugging Face systems
by `generate` keyword arguments. `write_truncated_copy` writes the checkpoint that vLLM's
stock draft-model speculation needs for an early-exit draft: the first E layers only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# layerskip-off: LayerSkip configured, drafting switched off at run time (worker RPC
# `layerskip_set_drafting`): what the plugin costs when it does not draft.
VLLM_SYSTEMS = ("vllm", "vllm-draft-truncated", "vllm-ngram", "layerskip", "layerskip-off")
HF_SYSTEMS = ("hf", "hf-early-exit")
ALL_SYSTEMS = VLLM_SYSTEMS + HF_SYSTEMS
SPEC_SYSTEMS = ("vllm-draft-truncated", "vllm-ngram", "layerskip", "hf-early-exit")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "generation_config.json", "tokenizer.model")


def parse_systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in ALL_SYSTEMS]
    if bad or not names:
        raise SystemExit(f"--systems: unknown {', '.join(bad) or '(empty)'}; "
                         f"allowed: {', '.join(ALL_SYSTEMS)}")
    return names


def read_config(model_dir) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def num_layers(model_dir) -> int:
    return int(read_config(model_dir)["num_hidden_layers"])


def layerskip_defaults(model_dir) -> dict:
    """exit_layer / num_speculative_tokens stored in the checkpoint (may be empty)."""
    try:
        from training.metadata import read_layerskip_metadata
        meta = read_layerskip_metadata(model_dir) or {}
    except ImportError:
        meta = read_config(model_dir).get("layerskip") or {}
    return {k: meta[k] for k in ("exit_layer", "num_speculative_tokens") if meta.get(k) is not None}


def add_spec_flags(ap) -> None:
    """--exit-layer and --num-speculative-tokens, each defaulting to the checkpoint's
    metadata (resolve_spec)."""
    ap.add_argument("--exit-layer", type=int, default=None, help="default: checkpoint metadata")
    ap.add_argument("--num-speculative-tokens", type=int, default=None,
                    help="draft length K (default: checkpoint metadata)")


def resolve_spec(model_dir, exit_layer: int | None, k: int | None) -> tuple[int, int]:
    """Exit layer and draft length: flags first, then checkpoint metadata, then defaults."""
    n = num_layers(model_dir)
    meta = layerskip_defaults(model_dir)
    e = exit_layer if exit_layer is not None else meta.get("exit_layer", max(1, n // 4))
    k = k if k is not None else meta.get("num_speculative_tokens", 4)
    if not 1 <= e < n:
        raise SystemExit(f"--exit-layer must be between 1 and {n - 1} for this {n}-layer model, got {e}")
    if k < 1:
        raise SystemExit(f"--num-speculative-tokens must be >= 1, got {k}")
    return int(e), int(k)


# The projections that write a decoder layer's output into the residual stream.
_RESIDUAL_WRITERS = ("self_attn.o_proj.", "mlp.down_proj.")


def write_truncated_copy(model_dir, exit_layer: int, out_dir, silence_upper: bool = False) -> Path:
    """Copy of the checkpoint with only layers < exit_layer (plus embeddings, norm, LM head).

    With ``silence_upper`` the copy keeps every layer but zeroes the output projections of
    layers >= exit_layer: they still cost what they cost, but add nothing to the residual
    stream, so the exit at ``exit_layer`` equals the full model and every draft is accepted
    (the case where the speculative ideal is known exactly).

    Reuses an existing copy when it was written the same way from the same source files
    (size/mtime recorded in a stamp).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(model_dir), Path(out_dir)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise SystemExit(f"--model: no *.safetensors files in {src}")
    stamp = json.dumps({"exit_layer": exit_layer, "silence_upper": silence_upper,
                        "src": str(src.resolve()),
                        "files": [(p.name, p.stat().st_size, p.stat().st_mtime) for p in shards]})
    if (out / ".truncated-stamp").exists() and (out / ".truncated-stamp").read_text() == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                upper = ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= exit_layer
                if upper and not silence_upper:
                    continue
                tensors[name] = f.get_tensor(name)
                if upper and any(w in name for w in _RESIDUAL_WRITERS):
                    tensors[name] = tensors[name].zero_()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = read_config(src)
    if not silence_upper:
        cfg["num_hidden_layers"] = exit_layer
        cfg.pop("layerskip", None)
        for key in ("layer_types", "sliding_window_layers"):
            if isinstance(cfg.get(key), list):
                cfg[key] = cfg[key][:exit_layer]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    (out / ".truncated-stamp").write_text(stamp)
    return out


def vllm_engine_kwargs(system: str, model_dir, exit_layer: int, k: int, *, dtype: str,
                       max_model_len: int, max_num_seqs: int, truncated_dir=None,
                       enforce_eager: bool = False, seed: int = 0,
                       kv_cache_gib: float = 1.0, adaptive_drafting: bool = True,
                       layerskip_settings: dict | None = None) -> dict:
    """`vllm.LLM(**kwargs)` for one system (``layerskip_settings``: further LayerSkip
    settings, such as draft_vocab_size or draft_confidence_threshold).

    The KV cache size is fixed (``kv_cache_gib``) rather than a fraction of memory, so every
    system gets the same cache and start-up does not depend on what else runs on the machine.
    """
    kw = dict(model=str(model_dir), dtype=dtype, max_model_len=max_model_len,
              max_num_seqs=max_num_seqs, seed=seed, enforce_eager=enforce_eager,
              disable_log_stats=False, kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)))
    if system == "vllm":
        pass
    elif system == "vllm-ngram":
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                    "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    elif system == "vllm-draft-truncated":
        if truncated_dir is None:
            raise ValueError("vllm-draft-truncated needs the truncated copy")
        kw["speculative_config"] = {"method": "draft_model", "model": str(truncated_dir),
                                    "num_speculative_tokens": k}
    elif system in ("layerskip", "layerskip-off"):
        kw["speculative_config"] = {"method": "layerskip", "exit_layer": exit_layer,
                                    "num_speculative_tokens": k,
                                    "adaptive_drafting": adaptive_drafting,
                                    **(layerskip_settings or {})}
    else:
        raise ValueError(f"not a vLLM system: {system}")
    return kw


def drafting_mode(system: str) -> str | None:
    """The run-time drafting mode a system sets after start-up (None: as configured)."""
    return "off" if system == "layerskip-off" else None


def hf_generate_kwargs(system: str, exit_layer: int, k: int) -> dict:
    if system == "hf":
        return {}
    if system == "hf-early-exit":
        # transformers' reference LayerSkip: the first E layers + LM head draft, the full
        # model verifies. Its own draft-length heuristics (adaptive number of assistant
        # tokens, confidence threshold) are left at their defaults, as users run it.
        return {"assistant_early_exit": exit_layer}
    raise ValueError(f"not a Hugging Face system: {system}")
