"""Send a soak load (`benchmarks.soak_load`) to one server: streamed completions with at
most ``concurrency`` in flight, some dropped after a few chunks (the server aborts them),
and the malformed requests, each answered by a status and a message.

Bounded: every request has a timeout and the whole pass a deadline; a dead server makes the
remaining requests fail fast instead of hanging. Only 127.0.0.1 is contacted (aiohttp does
not read proxy settings unless told to).
"""
from __future__ import annotations

import asyncio
import json
import time

from benchmarks.soak_load import Bad, Good, Load


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    err = body.get("error")
    msg = err.get("message") if isinstance(err, dict) else err
    return str(msg or body.get("message") or body.get("detail") or "")


def _apply_chunk(out: dict, msg: dict) -> None:
    for choice in msg.get("choices") or []:
        out["text"] += choice.get("text") or ""
        if choice.get("finish_reason"):
            out["finish_reason"] = choice["finish_reason"]
            out["stop_reason"] = choice.get("stop_reason")


async def _stream(session, url: str, model: str, item: Good) -> dict:
    out = {"rid": item.rid, "status": None, "text": "", "finish_reason": None,
           "stop_reason": None, "chunks": 0, "aborted": False, "error": None}
    body = {**item.body, "model": model, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        out["status"] = resp.status
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            return out
        async for raw in resp.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            msg = json.loads(payload)
            if "error" in msg:  # vLLM reports failures inside the stream
                out["error"] = _error_message(payload) or payload[:300]
                break
            _apply_chunk(out, msg)
            out["chunks"] += 1
            if item.abort_after and out["chunks"] >= item.abort_after and not out["finish_reason"]:
                out["aborted"] = True
                resp.close()  # drop the connection: the server aborts the request
                break
    return out


async def _refused(session, url: str, model: str, item: Bad) -> dict:
    body = item.body
    if item.name != "unknown-model":
        body = body.replace('"MODEL"', json.dumps(model))
    async with session.post(url + "/v1/completions", data=body.encode(),
                            headers={"Content-Type": "application/json"}) as resp:
        text = await resp.text()
    msg = _error_message(text)
    return {"rid": item.rid, "name": item.name, "status": resp.status, "message": msg[:300],
            "ok": 400 <= resp.status < 500 and bool(msg)}


async def _one(session, url, model, item, sem, tally, bar) -> dict:
    streaming = isinstance(item, Good)
    async with sem:
        tally["streams"] += streaming
        tally["peak"] = max(tally["peak"], tally["streams"])
        try:
            if not streaming:
                return await _refused(session, url, model, item)
            return await _stream(session, url, model, item)
        except Exception as err:  # noqa: BLE001 - every failure is recorded, none stops the pass
            return {"rid": item.rid, "status": None, "error": f"{type(err).__name__}: {err}"[:300],
                    **({} if streaming else {"name": item.name, "ok": False})}
        finally:
            tally["streams"] -= streaming
            if bar is not None:
                bar.update()


async def _run(url, model, load: Load, concurrency, request_timeout, pass_timeout, bar):
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    tally = {"streams": 0, "peak": 0}  # streams open now, and the most at once
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = [asyncio.ensure_future(_one(session, url, model, it, sem, tally, bar))
                 for it in load.items]
        done, pending = await asyncio.wait(tasks, timeout=pass_timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    results = []
    for it, t in zip(load.items, tasks):
        res = t.result() if t in done else {"rid": it.rid, "status": None,
                                            "error": f"not finished within {pass_timeout:.0f} s"}
        results.append(res)
    return results, tally["peak"]


def run_pass(url: str, model: str, load: Load, concurrency: int, request_timeout: float,
             pass_timeout: float, desc: str = "load") -> dict:
    """One pass of the load; results by request id, duration, most streams open at once."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(load.items), desc=desc, unit="req", mininterval=1.0) as bar:
        results, peak = asyncio.run(_run(url, model, load, concurrency, request_timeout,
                                         pass_timeout, bar))
    return {"results": {r["rid"]: r for r in results}, "duration_s": time.perf_counter() - t0,
            "peak_streams": peak}


def summarize(load: Load, run: dict) -> dict:
    """Counts for one pass: completed, aborted, failed, refused bad requests."""
    res = run["results"]
    completed = aborted = failed = 0
    failures = []
    for g in load.good:
        r = res[g.rid]
        if r.get("aborted"):
            aborted += 1
        elif r.get("status") == 200 and r.get("finish_reason") and not r.get("error"):
            completed += 1
        else:
            failed += 1
            failures.append({"rid": g.rid, "kind": g.kind, "error": r.get("error")})
    bad = [res[b.rid] for b in load.bad]
    return {"requests": len(load.items), "completed": completed, "aborted": aborted,
            "failed": failed, "bad_4xx": sum(1 for b in bad if b.get("ok")), "bad": len(bad),
            "bad_refusals": [{k: b.get(k) for k in ("name", "status", "message")} for b in bad],
            "failures": failures[:10], "duration_s": round(run["duration_s"], 2),
            "peak_streams": run["peak_streams"]}
