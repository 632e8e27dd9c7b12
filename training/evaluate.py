"""Per-exit report on held-out data.

    python -m training.evaluate --model DIR --data PATH... --json OUT [--plot OUT.png] [--baseline DIR]

For every exit_layer E = 1..L (decoder layers run before exiting) it reports the
next-token loss and top-1 accuracy of the read-out norm(h_E) -> lm_head, and the
agreement: how often its argmax equals the last layer's (the drafting acceptance proxy)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from .cli import run_cli
from .data import load_texts, pack
from .early_exit_loss import exit_logits
from .errors import ConfigError
from .metadata import read_layerskip_metadata
from .models import load_model


@torch.no_grad()
def per_exit_stats(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """blocks [n, s] -> [{"layer", "loss", "accuracy", "agreement"}] for layer 1..L."""
    model.eval()
    layers = model.model.layers
    num_layers = len(layers)
    loss_sum = torch.zeros(num_layers, dtype=torch.float64)
    correct = torch.zeros(num_layers, dtype=torch.float64)
    agree = torch.zeros(num_layers, dtype=torch.float64)
    count = 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size]  # [b, s]
        hidden: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(
            lambda _m, _i, out: hidden.append(out[0] if isinstance(out, tuple) else out))
            for layer in layers]
        try:
            model.model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        targets = ids[:, 1:]  # [b, s-1]
        final_pred = exit_logits(model, hidden[-1])[:, :-1].argmax(-1)  # [b, s-1]
        for l, h in enumerate(hidden):
            logits = exit_logits(model, h)[:, :-1].float()  # [b, s-1, V]
            loss_sum[l] += nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            pred = logits.argmax(-1)
            correct[l] += (pred == targets).sum().item()
            agree[l] += (pred == final_pred).sum().item()
        count += targets.numel()
    return [{"layer": l + 1, "loss": loss_sum[l].item() / count,
             "accuracy": correct[l].item() / count, "agreement": agree[l].item() / count}
            for l in range(num_layers)]


def evaluate_dir(model_dir: str, data: list[str], seq_len: int | None, max_blocks: int,
                 batch_size: int, flag: str = "--model") -> list[dict]:
    model, tokenizer = load_model(model_dir, flag)
    if seq_len is None:
        meta = read_layerskip_metadata(model_dir) or {}
        seq_len = int(meta.get("training", {}).get("seq_len", 256))
    blocks = pack(load_texts(data), tokenizer, seq_len)[:max_blocks]
    return per_exit_stats(model, blocks, batch_size)


def plot_report(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    runs = [("model", report["layers"], "-")]
    if "baseline" in report:
        runs.append(("baseline", report["baseline"]["layers"], "--"))
    for ax, key in zip(axes, ("loss", "accuracy", "agreement")):
        for name, rows, style in runs:
            ax.plot([r["layer"] for r in rows], [r[key] for r in rows], style, marker="o", label=name)
        ax.set_xlabel("exit_layer (decoder layers run)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--json", required=True, metavar="OUT")
    p.add_argument("--plot", metavar="OUT.png")
    p.add_argument("--baseline", metavar="DIR", help="a second model to report beside --model")
    p.add_argument("--seq-len", type=int, help="default: the training seq_len from the metadata, else 256")
    p.add_argument("--max-blocks", type=int, default=64, help="evaluate at most this many sequences")
    p.add_argument("--batch-size", type=int, default=8)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.max_blocks < 1 or args.batch_size < 1:
        raise ConfigError("--max-blocks and --batch-size must be >= 1")
    report = {"model": args.model, "layers": evaluate_dir(args.model, args.data, args.seq_len,
                                                          args.max_blocks, args.batch_size)}
    if args.baseline:
        report["baseline"] = {"model": args.baseline, "layers": evaluate_dir(
            args.baseline, args.data, args.seq_len, args.max_blocks, args.batch_size, "--baseline")}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_report(report, args.plot)
    for row in report["layers"]:
        print(f"exit_layer {row['layer']:3d}  loss {row['loss']:.4f}  "
              f"accuracy {row['accuracy']:.4f}  agreement {row['agreement']:.4f}")


if __name__ == "__main__":
    run_cli(main)
