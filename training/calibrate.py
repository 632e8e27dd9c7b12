"""Choose exit_layer and num_speculative_tokens from per-exit agreement on held-out data.

Cost model of one self-speculative draft-verify cycle, in units of one full decode step.
A decode step reads every weight once, so its cost is counted in decoder layers' worth of
weights: L layers plus the LM head, which is worth H = vocab * hidden / (weights of one
layer) layers (H = 8 for SmolLM2-135M's 49,152 x 576 head: a draft through 10 of its 30
layers costs (10 + 8) / (30 + 8) = 0.47 of a step, not 10/30). The draft runs K tokens
through the first E layers and the head, K (E + H) / (L + H); the verification is one
forward over the K drafted tokens (1). If each drafted token is accepted independently with
probability a (the exit's argmax agreement with the last layer), the accepted prefix plus
the verifier's own token gives

    tokens per cycle = sum_{k=0}^{K} a^k = (1 - a^(K+1)) / (1 - a)

    expected_speedup(a, E, L, K, H) = [(1 - a^(K+1)) / (1 - a)] / (K (E + H) / (L + H) + 1)

It ignores the KV-cache reuse of the draft and the engine's per-step overheads, so it is
an upper-bound shape, good for ranking (E, K), not for promising wall-clock numbers."""
from __future__ import annotations

MAX_DRAFT_LEN = 8


def head_layers(config) -> float:
    """The LM head's weights in decoder layers' worth (H above), from a transformers config."""
    d, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    layer = d * head_dim * (2 * heads + 2 * kv) + 3 * d * inter   # q, o, k, v; gate, up, down
    return config.vocab_size * d / layer


def expected_speedup(acceptance: float, exit_layer: int, num_layers: int, draft_len: int,
                     head: float = 0.0) -> float:
    a = min(max(acceptance, 0.0), 1.0)
    tokens = draft_len + 1 if a >= 1.0 else (1.0 - a ** (draft_len + 1)) / (1.0 - a)
    return tokens / (draft_len * (exit_layer + head) / (num_layers + head) + 1.0)


def recommend(agreement: list[float], max_draft_len: int = MAX_DRAFT_LEN,
              head: float = 0.0) -> dict:
    """agreement[E-1] for exit_layer E = 1..L, `head` = H in layers. Searches E in 1..L-1
    (E = L drafts with the full model) and K in 1..max_draft_len; returns the metadata to
    store."""
    num_layers, head = len(agreement), round(head, 3)   # as stored: recomputable
    table: dict[str, dict[str, float]] = {}
    best = (0.0, 1, 1)
    for exit_layer in range(1, max(num_layers, 2)):
        a = agreement[min(exit_layer, num_layers) - 1]
        row = {}
        for k in range(1, max_draft_len + 1):
            s = expected_speedup(a, exit_layer, num_layers, k, head)
            row[str(k)] = round(s, 4)
            best = max(best, (s, -exit_layer, k))  # ties: prefer the earlier exit
        table[str(exit_layer)] = row
    speedup, neg_exit, k = best
    return {"exit_layer": -neg_exit, "num_speculative_tokens": k,
            "calibration": {"agreement": [round(a, 4) for a in agreement],
                            "expected_speedup": table, "best_expected_speedup": round(speedup, 4),
                            "head_layers": head,
                            "cost_model": "(1-a^(K+1))/(1-a) / (K*(E+H)/(L+H) + 1)"}}
