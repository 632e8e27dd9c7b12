"""A small streaming load generator for an OpenAI-compatible /v1/completions endpoint.

Used when vLLM's own client cannot run (its custom-dataset loader needs pandas). Sends a
fixed list of requests with at most ``concurrency`` in flight, streams each response and
records time to first token and the gaps between streamed chunks (inter-token latency, the
same definition as `vllm bench serve`: with speculation a chunk can carry several tokens).
"""
from __future__ import annotations

import asyncio
import json
import time


def percentile(values, p: float):
    if not values:
        return None
    s = sorted(values)
    idx = (len(s) - 1) * p / 100
    lo, hi = int(idx), min(int(idx) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (idx - lo)


async def _one(session, url, model, prompt, max_tokens, temperature):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "ignore_eos": True, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            msg = json.loads(line[5:])
            if msg.get("usage"):
                tokens = msg["usage"].get("completion_tokens", tokens)
            if not msg.get("choices") or not msg["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
    return {"ttft": (first or time.perf_counter()) - t0, "gaps": gaps, "tokens": tokens,
            "latency": time.perf_counter() - t0}


async def _run(url, model, prompts, concurrency, max_tokens, temperature, timeout):
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    tmo = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=tmo) as session:
        async def bounded(p):
            async with sem:
                return await _one(session, url, model, p, max_tokens, temperature)

        t0 = time.perf_counter()
        done = await asyncio.wait_for(asyncio.gather(*(bounded(p) for p in prompts),
                                                     return_exceptions=True), timeout)
        dur = time.perf_counter() - t0
    return done, dur


def run_load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
             temperature: float = 0.0, timeout: float = 600, warmup: int = 1) -> dict:
    """Same keys as `vllm bench serve`'s result JSON (the subset the report uses)."""
    if warmup:
        asyncio.run(_run(url, model, prompts[:warmup], 1, min(max_tokens, 8), temperature, timeout))
    done, dur = asyncio.run(_run(url, model, prompts, concurrency, max_tokens, temperature, timeout))
    ok = [d for d in done if isinstance(d, dict)]
    failed = [d for d in done if not isinstance(d, dict)]
    ttft = [d["ttft"] * 1000 for d in ok]
    itl = [g * 1000 for d in ok for g in d["gaps"]]
    tpot = [(d["latency"] - d["ttft"]) * 1000 / (d["tokens"] - 1) for d in ok if d["tokens"] > 1]
    out_tokens = sum(d["tokens"] for d in ok)
    res = {"completed": len(ok), "failed": len(failed), "duration": dur,
           "output_throughput": out_tokens / dur if dur else None,
           "request_throughput": len(ok) / dur if dur else None,
           "errors": [repr(f)[:200] for f in failed[:3]]}
    for name, vals in (("ttft", ttft), ("itl", itl), ("tpot", tpot),
                       ("e2el", [d["latency"] * 1000 for d in ok])):
        for p in (50, 99):
            res[f"p{p}_{name}_ms"] = percentile(vals, p)
    return res
