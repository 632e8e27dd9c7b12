"""What the user asked for, checked: `speculative_config={"method": "layerskip", ...}`.

Pure Python on plain dicts, no vLLM internals, so every bad-configuration message can be
tested without starting an engine. `_vllm.py` calls `resolve()` while vLLM builds its
configs, and turns the result into a stock `SpeculativeConfig`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

METHOD = "layerskip"

# vLLM model classes whose decoder is `model.embed_tokens -> model.layers[i](positions,
# hidden, residual) -> model.norm -> lm_head`, the structure the early-exit draft walks.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
)

# verify_from_exit_states: choose split or stock verification by measuring both.
ADAPTIVE = "adaptive"

# Where the training module stores its recommendation inside config.json.
METADATA_KEY = "layerskip"
# Inside it: token ids by frequency in the training data, most frequent first.
DRAFT_VOCAB_KEY = "draft_vocab"


class LayerSkipConfigError(ValueError):
    """One bad field of the layerskip speculative config, named with its valid range."""


@dataclass(frozen=True)
class LayerSkipSettings:
    exit_layer: int  # decoder layers the draft runs: 1 <= exit_layer < num_hidden_layers
    num_speculative_tokens: int  # draft_len: tokens drafted per verification step
    adaptive_drafting: bool = True  # per batch size, draft only where it measures faster
    # A request stops drafting after a token whose draft probability is below this; 0 = off.
    draft_confidence_threshold: float = 0.0
    # The draft's LM head covers the N most frequent token ids only; 0 = the full vocabulary.
    draft_vocab_size: int = 0
    # Verification runs layers >= E only for drafted tokens whose layer-E state was saved
    # (true), runs the stock forward over every layer (false), or, "adaptive", measures
    # both per batch-size bucket on drafting steps and keeps the faster.
    verify_from_exit_states: bool | str = True

    @property
    def verification(self) -> str:
        """How drafts are verified: "split", "stock" or "adaptive"."""
        if self.verify_from_exit_states == ADAPTIVE:
            return ADAPTIVE
        return "split" if self.verify_from_exit_states else "stock"

    def as_dict(self) -> dict:
        return asdict(self)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayerSkipConfigError(
            f"speculative_config.{name} must be an integer, got {value!r}"
        )
    return value


def resolve(
    user: Mapping[str, Any],
    *,
    architectures: Iterable[str] | None,
    num_hidden_layers: int,
    metadata: Mapping[str, Any] | None,
    allowed_fields: Iterable[str],
    pipeline_parallel_size: int = 1,
    tensor_parallel_size: int = 1,
) -> tuple[LayerSkipSettings, dict[str, Any]]:
    """Check the user's dict; return the settings and the fields to pass on to vLLM.

    `metadata` is the checkpoint's `config.json["layerskip"]` (written by training/):
    it supplies exit_layer, num_speculative_tokens, draft_confidence_threshold and
    draft_vocab_size when the user leaves them out (benchmarks.sweep --write stores the
    best); explicit values win. `allowed_fields` are the other SpeculativeConfig fields the
    user may set (draft sampling method, rejection-sampling options, ...).
    """
    rest = {k.replace("-", "_"): v for k, v in user.items() if k != "method"}
    archs = list(architectures or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise LayerSkipConfigError(
            f"layerskip does not support the architecture {archs or 'unknown'}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    metadata = dict(metadata or {})
    values = {}
    for name in ("exit_layer", "num_speculative_tokens"):
        raw = rest.pop(name, None)
        if raw is None:
            raw = metadata.get(name)
        if raw is None:
            raise LayerSkipConfigError(
                f"speculative_config.{name} is required: the checkpoint's config.json "
                f"has no '{METADATA_KEY}' metadata with a recommended {name}"
            )
        values[name] = _as_int(name, raw)

    exit_layer, draft_len = values["exit_layer"], values["num_speculative_tokens"]
    if not 1 <= exit_layer < num_hidden_layers:
        raise LayerSkipConfigError(
            f"speculative_config.exit_layer must be in [1, {num_hidden_layers - 1}] "
            f"(the model has {num_hidden_layers} decoder layers), got {exit_layer}"
        )
    if draft_len < 1:
        raise LayerSkipConfigError(
            f"speculative_config.num_speculative_tokens must be >= 1, got {draft_len}"
        )
    if pipeline_parallel_size > 1:
        first_stage = num_hidden_layers // pipeline_parallel_size
        where = (
            f"exit_layer={exit_layer} lies beyond the first pipeline stage "
            f"(layers 0..{first_stage - 1})"
            if exit_layer > first_stage
            else "the draft needs the LM head, which lives on the last stage"
        )
        raise LayerSkipConfigError(
            f"layerskip needs pipeline_parallel_size=1, got {pipeline_parallel_size}: {where}"
        )

    adaptive = rest.pop("adaptive_drafting", True)
    if not isinstance(adaptive, bool):
        raise LayerSkipConfigError(
            f"speculative_config.adaptive_drafting must be true or false, got {adaptive!r}")
    reuse = rest.pop("verify_from_exit_states", True)
    if not isinstance(reuse, bool) and reuse != ADAPTIVE:
        raise LayerSkipConfigError(
            f"speculative_config.verify_from_exit_states must be true, false or "
            f"\"{ADAPTIVE}\", got {reuse!r}")

    threshold = rest.pop("draft_confidence_threshold", metadata.get("draft_confidence_threshold", 0.0))
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise LayerSkipConfigError(
            f"speculative_config.draft_confidence_threshold must be a number in [0, 1) "
            f"(0 = off), got {threshold!r}"
        )

    vocab_size = _as_int("draft_vocab_size",
                         rest.pop("draft_vocab_size", metadata.get("draft_vocab_size", 0)))
    ranking = metadata.get(DRAFT_VOCAB_KEY) or []
    if vocab_size < 0:
        raise LayerSkipConfigError(
            f"speculative_config.draft_vocab_size must be >= 0 (0 = full vocabulary), got {vocab_size}")
    if vocab_size and len(ranking) < vocab_size:
        raise LayerSkipConfigError(
            f"speculative_config.draft_vocab_size={vocab_size} needs a ranking of at least that "
            f"many token ids in config.json's '{METADATA_KEY}.{DRAFT_VOCAB_KEY}' (it has "
            f"{len(ranking)}); write one with: python -m training.token_ranking --model DIR --data PATH")
    if vocab_size and tensor_parallel_size > 1:
        raise LayerSkipConfigError(
            f"speculative_config.draft_vocab_size needs tensor_parallel_size=1 (the LM head is "
            f"split by vocabulary across ranks), got {tensor_parallel_size}")

    allowed = set(allowed_fields)
    unknown = sorted(set(rest) - allowed)
    if unknown:
        raise LayerSkipConfigError(
            f"speculative_config has unknown field(s) {', '.join(unknown)} for method "
            f"'layerskip'; allowed: exit_layer, num_speculative_tokens, adaptive_drafting, "
            f"draft_confidence_threshold, draft_vocab_size, verify_from_exit_states, "
            f"{', '.join(sorted(allowed))}"
        )
    return LayerSkipSettings(exit_layer, draft_len, adaptive, float(threshold), vocab_size, reuse), rest
