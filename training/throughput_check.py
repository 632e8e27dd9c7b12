"""Training throughput with and without layer dropout on a random-init Llama.

    python -m training.throughput_check [--layers 8 --hidden-size 256 --steps 30 --p-max 0.2]

Both settings run the same steps (forward, backward, AdamW) on random tokens, with the
early-exit loss off so that only layer dropout differs; the runs are interleaved in
rounds so that load from other processes hits both alike."""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .layer_dropout import drop_probabilities, sample_keep_mask
from .layerskip_model import LayerSkipLM


def _steps(skipper: LayerSkipLM, opt, p_max: float, steps: int, batch: int, seq: int,
           vocab: int, seed: int) -> float:
    """Seconds for `steps` training steps."""
    gen = torch.Generator().manual_seed(seed)
    num_layers = skipper.num_layers
    weights = [0.0] * (num_layers - 1) + [1.0]
    probs = drop_probabilities(num_layers, 0, 1, p_max)
    start = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)  # [b, s]
        keep = sample_keep_mask(probs, batch, gen) if p_max > 0 else None  # [L, b]
        skipper(ids, keep, weights).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.throughput_check", description=__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="per setting, split into rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--p-max", type=float, default=0.2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=4 * args.hidden_size, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden_size // 64),
                         num_key_value_heads=max(1, args.hidden_size // 64))
    skipper = LayerSkipLM(LlamaForCausalLM(config).train())
    opt = torch.optim.AdamW(skipper.parameters(), lr=1e-4)
    per_round = max(1, args.steps // args.rounds)
    _steps(skipper, opt, 0.0, 2, args.batch_size, args.seq_len, args.vocab_size, 99)  # warm-up
    totals = {0.0: 0.0, args.p_max: 0.0}
    for r in range(args.rounds):
        for p_max in totals:
            totals[p_max] += _steps(skipper, opt, p_max, per_round, args.batch_size,
                                    args.seq_len, args.vocab_size, r)
    tokens = args.rounds * per_round * args.batch_size * args.seq_len
    for p_max, seconds in totals.items():
        print(f"p_max {p_max:.2f}: {tokens / seconds:8.0f} tokens/s ({seconds:.1f} s)")
    print(f"speed-up from layer dropout: {totals[0.0] / totals[args.p_max]:.3f}x")


if __name__ == "__main__":
    main()
