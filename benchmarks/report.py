"""Markdown tables and matplotlib charts for benchmark results."""
from __future__ import annotations

from pathlib import Path


def _fmt(v, spec="{:.2f}", none="-"):
    return none if v is None else spec.format(v)


def throughput_table(rows: list[dict]) -> str:
    head = ("| system | prompts | batch | temp | tokens/s | speedup | acceptance | "
            "mean accepted len | ideal speedup | of ideal | peak MB | KV blocks |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        frac = (r["speedup"] / r["ideal_speedup"]) if r.get("ideal_speedup") and r.get("speedup") \
            else None
        lines.append(
            f"| {r['system']} | {r.get('prompt_set', '-')} | {r['batch_size']} | "
            f"{r['temperature']:g} | {r['tokens_per_s']:.1f} | {_fmt(r['speedup'], '{:.2f}x')} | "
            f"{_fmt(r['acceptance_rate'], '{:.0%}')} | {_fmt(r['mean_accepted_length'])} | "
            f"{_fmt(r['ideal_speedup'], '{:.2f}x')} | {_fmt(frac, '{:.0%}')} | "
            f"{_fmt(r['peak_memory_mb'], '{:.0f}')} | {_fmt(r['kv_blocks'], '{}')} |")
    return "\n".join(lines) + "\n"


def throughput_chart(rows: list[dict], path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.get("prompt_set", "code"), r["temperature"]) for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (ps, temp) in zip(axes[0], panels):
        sub = [r for r in rows if r.get("prompt_set", "code") == ps and r["temperature"] == temp]
        batches = sorted({r["batch_size"] for r in sub})
        width = 0.8 / max(1, len(systems))
        for i, s in enumerate(systems):
            xs, ys = [], []
            for j, b in enumerate(batches):
                hit = [r for r in sub if r["system"] == s and r["batch_size"] == b]
                if hit and hit[0]["speedup"] is not None:
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(hit[0]["speedup"])
            ax.bar(xs, ys, width, label=s)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("speedup vs vllm")
        ax.set_title(f"{ps} prompts, temperature {temp:g}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the legend sits below the panels, off the bars
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def point_label(point: dict) -> str:
    """'E7', or 'E7 v8192 t0.5' where a grid point sets the extra settings."""
    label = f"E{point['exit_layer']}"
    if point.get("draft_vocab_size"):
        label += f" v{point['draft_vocab_size']}"
    if point.get("draft_confidence_threshold"):
        label += f" t{point['draft_confidence_threshold']:g}"
    return label


def sweep_heatmap(grid: list[dict], path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Rows: exit layer (with the vocabulary subset / threshold where swept); columns: K.
    es = list(dict.fromkeys(point_label(g) for g in sorted(
        grid, key=lambda g: (g["exit_layer"], g.get("draft_vocab_size", 0),
                             g.get("draft_confidence_threshold", 0.0)))))
    ks = sorted({g["num_speculative_tokens"] for g in grid})
    val = {(point_label(g), g["num_speculative_tokens"]): g.get("speedup") for g in grid}
    data = [[val.get((e, k)) if val.get((e, k)) is not None else float("nan") for k in ks]
            for e in es]
    fig, ax = plt.subplots(figsize=(1.2 * len(ks) + 2.5, 0.8 * len(es) + 2))
    im = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(es)), es)
    ax.set_xlabel("num_speculative_tokens (K)")
    ax.set_ylabel("exit_layer E (v: draft_vocab_size, t: confidence threshold)")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, "fail" if v != v else f"{v:.2f}x", ha="center", va="center",
                    color="white", fontsize=9)
    fig.colorbar(im, ax=ax, label="speedup vs vllm")
    ax.set_title(title or "LayerSkip speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def sweep_table(grid: list[dict]) -> str:
    lines = ["| exit_layer | K | draft vocab | threshold | tokens/s | speedup | acceptance | "
             "mean accepted len |", "|---|---|---|---|---|---|---|---|"]
    for g in grid:
        lines.append(f"| {g['exit_layer']} | {g['num_speculative_tokens']} | "
                     f"{g.get('draft_vocab_size') or 'full'} | "
                     f"{g.get('draft_confidence_threshold') or '-'} | "
                     f"{_fmt(g.get('tokens_per_s'), '{:.1f}')} | {_fmt(g.get('speedup'), '{:.2f}x')} | "
                     f"{_fmt(g.get('acceptance_rate'), '{:.0%}')} | "
                     f"{_fmt(g.get('mean_accepted_length'))} |")
    return "\n".join(lines) + "\n"


def serving_table(rows: list[dict]) -> str:
    lines = ["| system | concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | "
             "ITL p50 ms | ITL p99 ms | speedup |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['completed']} | "
                     f"{r['output_tokens_per_s']:.1f} | {_fmt(r['ttft_p50_ms'], '{:.1f}')} | "
                     f"{_fmt(r['ttft_p99_ms'], '{:.1f}')} | {_fmt(r['itl_p50_ms'], '{:.1f}')} | "
                     f"{_fmt(r['itl_p99_ms'], '{:.1f}')} | {_fmt(r.get('speedup'), '{:.2f}x')} |")
    return "\n".join(lines) + "\n"


def serving_chart(rows: list[dict], path) -> Path:
    """Output tokens/s and inter-token latency (p50 solid, p99 dashed) by concurrency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, itl) = plt.subplots(1, 2, figsize=(10, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        sub = sorted((r for r in rows if r["system"] == system), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in sub]
        (line,) = tput.plot(xs, [r["output_tokens_per_s"] for r in sub], marker="o", label=system)
        for field, style in (("itl_p50_ms", "-"), ("itl_p99_ms", "--")):
            points = [(x, r[field]) for x, r in zip(xs, sub) if r[field] is not None]
            if points:
                itl.plot(*zip(*points), marker="o", ls=style, color=line.get_color())
    levels = sorted({r["concurrency"] for r in rows})
    for ax, label in ((tput, "output tokens/s"), (itl, "inter-token latency, ms (p50 -, p99 --)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
    tput.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
