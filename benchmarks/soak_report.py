"""The soak test's verdicts: output comparisons between passes and servers, the named
checks (True = passed, False = failed, None = could not be checked), and the Markdown
report."""
from __future__ import annotations

from benchmarks.soak_load import Load

SEEDED_KINDS = ("seeded", "seeded-top-p", "seeded-top-k")
MEMORY_TOLERANCE = 0.05


def _usable(r: dict | None) -> bool:
    return bool(r) and r.get("status") == 200 and bool(r.get("finish_reason")) \
        and not r.get("aborted") and not r.get("error")


def compare(load: Load, reference: dict, runs: list[dict], kinds) -> dict:
    """Each non-aborting request of ``kinds`` in every run against ``reference`` (results by
    request id): text and finish reason must be equal. A request missing on either side
    (failed) counts as missing, and a check that needs equality fails on it."""
    out = {"planned": 0, "compared": 0, "mismatches": 0, "missing": 0, "by_kind": {},
           "examples": []}
    for g in load.good:
        if g.kind not in kinds or g.abort_after is not None:
            continue
        for run in runs:
            out["planned"] += 1
            ref, got = reference.get(g.rid), run.get(g.rid)
            if not (_usable(ref) and _usable(got)):
                out["missing"] += 1
                continue
            out["compared"] += 1
            if (ref["text"], ref["finish_reason"]) != (got["text"], got["finish_reason"]):
                out["mismatches"] += 1
                out["by_kind"][g.kind] = out["by_kind"].get(g.kind, 0) + 1
                if len(out["examples"]) < 3:
                    out["examples"].append({"rid": g.rid, "kind": g.kind,
                                            "expected": ref["text"][:80], "got": got["text"][:80]})
    return out


def _all_equal(c: dict) -> bool | None:
    """None (not checked) when the load has no such request."""
    return None if not c["planned"] else c["mismatches"] == 0 and c["missing"] == 0


def server_checks(s: dict, planned_aborts: int, tolerance: float = MEMORY_TOLERANCE) -> dict:
    """Checks that hold for either server (``s``: one server's section of the report)."""
    if not s.get("started"):
        return {"started": False}
    passes = s["passes"]
    mem_warm, mem_after = s["memory_mib"]["after_warmup"], s["memory_mib"]["after_load"]
    checks = {
        "started": True,
        "no_failures": all(p["failed"] == 0 for p in passes + [s["warmup"]]),
        "aborts_happened": planned_aborts == 0 or all(p["aborted"] > 0 for p in passes),
        "preempted": (s["metrics"]["preemptions"] or 0) > 0,
        "prefix_cache_hit": (s["metrics"]["prefix_cache_hits"] or 0) > 0,
        "bad_requests_refused_4xx": all(p["bad_4xx"] == p["bad"] for p in passes),
        # a server that died has no memory to compare: not checked (other checks fail)
        "memory_stable": None if mem_after is None
        else bool(mem_warm) and mem_after <= mem_warm * (1 + tolerance),
        "seeded_reproducible": _all_equal(s["seeded"]),
        "engine_idle_after_load": s["idle_after_load"],  # no request left running or waiting
        "healthy_at_end": s["health_at_end"] == 200,
    }
    if "spec" in s:
        drafted, accepted = s["spec"]["drafted"], s["spec"]["accepted"]
        checks["spec_counters_consistent"] = drafted > 0 and accepted <= drafted
        checks["greedy_equals_plain"] = _all_equal(s["greedy"])
        live = s["spec"].get("live_request_states")
        checks["no_live_request_state"] = None if live is None else live == 0
    else:
        checks["greedy_reproducible"] = _all_equal(s["greedy"])
    return checks


def _fmt(v, spec="{}"):
    return "-" if v is None else spec.format(v)


def _row(name: str, s: dict) -> str:
    if not s.get("started"):
        return f"| {name} | did not start: {s.get('error', '?')[:80]} |" + " |" * 11
    tot = lambda key: sum(p[key] for p in s["passes"])  # noqa: E731
    mem = s["memory_mib"]
    spec = s.get("spec") or {}
    cells = [name, tot("requests"), tot("completed"), tot("aborted"),
             _fmt(s["metrics"]["preemptions"], "{:.0f}"), tot("failed") + s["warmup"]["failed"],
             f"{s['greedy']['mismatches']} (+{s['greedy']['missing']} missing)",
             f"{s['seeded']['mismatches']} (+{s['seeded']['missing']} missing)",
             f"{tot('bad_4xx')}/{tot('bad')}",
             f"{_fmt(mem['after_warmup'], '{:.0f}')} / {_fmt(mem['after_load'], '{:.0f}')}",
             f"{s['load_duration_s']:.1f}",
             f"{_fmt(spec.get('drafted'), '{:.0f}')} / {_fmt(spec.get('accepted'), '{:.0f}')}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(report: dict) -> str:
    head = ("| server | requests | completed | aborts | preemptions | failures | greedy mismatches "
            "| seeded mismatches | bad requests 4xx | memory warm-up / after (MiB) | load s "
            "| drafted / accepted |")
    lines = [head, "|" + "---|" * 12]
    lines += [_row(name, s) for name, s in report["servers"].items()]
    lines += ["", "| check | result |", "|---|---|"]
    for name, ok in report["checks"].items():
        lines.append(f"| {name} | {'pass' if ok else 'not checked' if ok is None else 'FAIL'} |")
    if report.get("notes"):
        lines.append("")
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"
