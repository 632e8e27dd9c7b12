"""Serving benchmark: `vllm serve` with and without LayerSkip, driven at several concurrencies.

    python -m benchmarks.serving --model DIR [--exit-layer E] [--num-speculative-tokens K]
        [--concurrency 1,8,32] [--num-requests 64] [--json OUT]

Each system gets its own server on 127.0.0.1 (a free port, its own process group, killed
afterwards). vLLM's own client (`vllm bench serve`, custom dataset of held-out prompts,
``--ignore-eos``) sends a bounded number of requests per concurrency level and reports output
throughput, time to first token and inter-token latency (p50/p99). vLLM's custom-dataset
loader needs pandas; without it (``--client auto``) the built-in streaming client
(`benchmarks.loadgen`, same metric definitions) drives the server. Every step has a time
limit; the run stops by itself.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import report, server
from benchmarks.loadgen import run_load
from benchmarks.machine import add_dtype_flag
from benchmarks.prompts import PROMPT_SETS, load_prompts
from benchmarks.runner import default_work_dir, log_tail, process_group
from benchmarks.systems import add_spec_flags, resolve_spec
from benchmarks.throughput import _int_list

SERVING_SYSTEMS = ("vllm", "layerskip")
SPEC_METRICS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens")


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    add_spec_flags(ap)
    ap.add_argument("--systems", default="vllm,layerskip",
                    help=f"comma-separated subset of {','.join(SERVING_SYSTEMS)}")
    ap.add_argument("--concurrency", type=_int_list("--concurrency"), default=[1, 8, 32])
    ap.add_argument("--num-requests", type=int, default=None,
                    help="requests per concurrency level (default: max(16, 2 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-set", choices=PROMPT_SETS, default="code")
    ap.add_argument("--prompt-chars", type=int, default=600)
    add_dtype_flag(ap)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--fixed-drafting", action="store_true",
                    help="layerskip drafts every step (adaptive_drafting off)")
    ap.add_argument("--startup-timeout", type=float, default=600, help="seconds for a server to come up")
    ap.add_argument("--level-timeout", type=float, default=1200,
                    help="seconds allowed per concurrency level")
    ap.add_argument("--client", choices=["auto", "vllm-bench", "builtin"], default="auto",
                    help="auto: `vllm bench serve` when pandas is installed, else built-in")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None, help="default: <work dir>/serving.json")
    return ap


def serve_args(args, system, e, k) -> list[str]:
    """`vllm serve` flags after the model, host and port."""
    cmd = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(max(args.concurrency)),
           "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * (1 << 30))), "--seed", "0"]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if system == "layerskip":
        cmd += ["--speculative-config", json.dumps(
            {"method": "layerskip", "exit_layer": e, "num_speculative_tokens": k,
             "adaptive_drafting": not args.fixed_drafting})]
    return cmd


def scrape_spec_metrics(url: str) -> dict:
    """Spec-decode counters from the server's Prometheus /metrics (summed over labels)."""
    m = server.metrics(url)
    return {name: m.get(name + "_total", 0.0) for name in SPEC_METRICS}


def bench_level(args, url, dataset, n, c, work, name) -> dict:
    """One `vllm bench serve` run: n requests at concurrency c; returns its result JSON."""
    res_name = f"{name}-c{c}.json"
    cmd = server.vllm_cli() + [
        "bench", "serve", "--backend", "vllm", "--base-url", url, "--model", str(args.model),
        "--tokenizer", str(args.model), "--dataset-name", "custom", "--dataset-path", str(dataset),
        "--custom-output-len", str(args.max_tokens), "--skip-chat-template",
        "--num-prompts", str(n), "--max-concurrency", str(c), "--request-rate", "inf",
        "--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,itl,tpot,e2el",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(work),
        "--result-filename", res_name, "--disable-tqdm", "--num-warmups", "1", "--seed", "0"]
    log = work / f"{name}-c{c}.log"
    (work / res_name).unlink(missing_ok=True)
    with process_group(cmd, log) as proc:
        try:
            rc = proc.wait(timeout=args.level_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"concurrency {c}: no result after {args.level_timeout:.0f} s")
    if rc != 0 or not (work / res_name).exists():
        raise RuntimeError(f"vllm bench serve failed ({rc}):\n{log_tail(log)}")
    return json.loads((work / res_name).read_text())


def run_system(args, system, e, k, dataset, prompts, work, bar) -> list[dict]:
    log = work / f"serve-{system}.log"
    rows = []
    with server.running_server(args.model, serve_args(args, system, e, k), log,
                               args.startup_timeout) as srv:
        url = srv.url
        for c in args.concurrency:
            bar.set_postfix_str(f"{system} c={c}")
            n = args.num_requests or max(16, 2 * c)
            before = scrape_spec_metrics(url)
            if args.client == "vllm-bench":
                r = bench_level(args, url, dataset, n, c, work, f"bench-{system}")
            else:
                r = run_load(url, str(args.model), prompts[:n], c, args.max_tokens,
                             timeout=args.level_timeout)
                if r["failed"]:
                    raise RuntimeError(f"{system} c={c}: {r['failed']} requests failed: {r['errors']}")
            after = scrape_spec_metrics(url)
            d = {m: after[m] - before[m] for m in SPEC_METRICS}
            drafted, drafts = d[SPEC_METRICS[1]], d[SPEC_METRICS[0]]
            rows.append({
                "system": system, "concurrency": c, "num_requests": n,
                "completed": r.get("completed"), "duration_s": r.get("duration"),
                "output_tokens_per_s": r.get("output_throughput"),
                "request_throughput": r.get("request_throughput"),
                "ttft_p50_ms": r.get("p50_ttft_ms"), "ttft_p99_ms": r.get("p99_ttft_ms"),
                "itl_p50_ms": r.get("p50_itl_ms"), "itl_p99_ms": r.get("p99_itl_ms"),
                "tpot_p50_ms": r.get("p50_tpot_ms"), "e2el_p50_ms": r.get("p50_e2el_ms"),
                "acceptance_rate": d[SPEC_METRICS[2]] / drafted if drafted else None,
                "mean_accepted_length": 1 + d[SPEC_METRICS[2]] / drafts if drafts else None})
            bar.update()
    return rows


def main(argv=None) -> int:
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model: {args.model} is not a checkpoint directory (no config.json)")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or any(s not in SERVING_SYSTEMS for s in systems):
        raise SystemExit(f"--systems: allowed {', '.join(SERVING_SYSTEMS)}, got {args.systems!r}")
    if args.num_requests is not None and args.num_requests < 1:
        raise SystemExit(f"--num-requests must be >= 1, got {args.num_requests}")
    e, k = resolve_spec(args.model, args.exit_layer, args.num_speculative_tokens)
    work = (Path(args.work_dir) if args.work_dir else default_work_dir(Path(args.model).name)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    n_max = args.num_requests or max(16, 2 * max(args.concurrency))
    dataset = work / "serving-prompts.jsonl"
    prompts = load_prompts(args.prompt_set, n_max, args.prompt_chars)
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    if args.client == "auto":
        import importlib.util
        args.client = "vllm-bench" if importlib.util.find_spec("pandas") else "builtin"
    elif args.client == "vllm-bench":
        import importlib.util
        if importlib.util.find_spec("pandas") is None:
            raise SystemExit("--client vllm-bench: vLLM's custom dataset needs pandas "
                             "(pip install pandas), or use --client builtin")
    rows, errors = [], []
    with tqdm(total=len(systems) * len(args.concurrency), desc="serving", unit="level") as bar:
        for system in systems:
            try:
                rows += run_system(args, system, e, k, dataset, prompts, work, bar)
            except RuntimeError as err:
                errors.append({"system": system, "error": str(err).splitlines()[0]})
                bar.write(f"{system}: FAILED\n{err}")
    base = {r["concurrency"]: r["output_tokens_per_s"] for r in rows if r["system"] == "vllm"}
    for r in rows:
        b = base.get(r["concurrency"])
        r["speedup"] = round(r["output_tokens_per_s"] / b, 3) if b and r["output_tokens_per_s"] else None
    out = {"results": rows, "errors": errors,
           "settings": {"model": str(args.model), "exit_layer": e, "num_speculative_tokens": k,
                        "max_tokens": args.max_tokens, "dtype": args.dtype,
                        "prompt_set": args.prompt_set, "adaptive_drafting": not args.fixed_drafting,
                        "client": "vllm bench serve" if args.client == "vllm-bench" else "benchmarks.loadgen"}}
    json_path = Path(args.json) if args.json else work / "serving.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(report.serving_table(rows))
    if rows:
        report.serving_chart(rows, json_path.with_suffix(".png"))
    print(report.serving_table(rows))
    print(f"wrote {json_path} (and .md, .png)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
