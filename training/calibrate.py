"""Choose exit_layer and num_speculative_tokens from per-exit agreement on held-out data.

Cost model of one self-speculative draft-verify cycle, in units of one full decode step:
the draft runs K tokens through the first E of L layers (K * E/L) and the verification
is one full forward over the K drafted tokens (1). If each drafted token is accepted
independently with probability a (the exit's argmax agreement with the last layer), the
accepted prefix plus the verifier's own token gives

    tokens per cycle = sum_{k=0}^{K} a^k = (1 - a^(K+1)) / (1 - a)

    expected_speedup(a, E, L, K) = [(1 - a^(K+1)) / (1 - a)] / (K * E / L + 1)

It ignores the KV-cache reuse of the draft and per-token overheads, so it is an upper
bound shape, good for ranking (E, K), not for promising wall-clock numbers."""
from __future__ import annotations

MAX_DRAFT_LEN = 8


def expected_speedup(acceptance: float, exit_layer: int, num_layers: int, draft_len: int) -> float:
    a = min(max(acceptance, 0.0), 1.0)
    tokens = draft_len + 1 if a >= 1.0 else (1.0 - a ** (draft_len + 1)) / (1.0 - a)
    return tokens / (draft_len * exit_layer / num_layers + 1.0)


def recommend(agreement: list[float], max_draft_len: int = MAX_DRAFT_LEN) -> dict:
    """agreement[E-1] for exit_layer E = 1..L. Searches E in 1..L-1 (E = L drafts with
    the full model) and K in 1..max_draft_len; returns the metadata to store."""
    num_layers = len(agreement)
    table: dict[str, dict[str, float]] = {}
    best = (0.0, 1, 1)
    for exit_layer in range(1, max(num_layers, 2)):
        a = agreement[min(exit_layer, num_layers) - 1]
        row = {}
        for k in range(1, max_draft_len + 1):
            s = expected_speedup(a, exit_layer, num_layers, k)
            row[str(k)] = round(s, 4)
            best = max(best, (s, -exit_layer, k))  # ties: prefer the earlier exit
        table[str(exit_layer)] = row
    speedup, neg_exit, k = best
    return {"exit_layer": -neg_exit, "num_speculative_tokens": k,
            "calibration": {"agreement": [round(a, 4) for a in agreement],
                            "expected_speedup": table, "best_expected_speedup": round(speedup, 4),
                            "cost_model": "(1-a^(K+1))/(1-a) / (K*E/L + 1)"}}
