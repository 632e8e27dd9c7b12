"""Keep an engine's helper processes off the core its worker computes on.

vLLM's CPU worker binds its OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND=auto`) to all cores
but the last, which it "reserves" for the other processes; it does not bind those other
processes, though. The engine core busy-polls the worker's shared-memory queue while a step
runs, and the front end waits on it; left to the kernel, they may land on the worker's core
and share it with a spinning poller. Benchmarks pin every thread of the engine's non-worker
processes to the reserved cores, so that placement is the same for every engine. (This was
meant to remove a 20-30% creation-order bias between engines on the 2-core Xeon; it did
not: see benchmarks.overhead's control engine.)
"""
from __future__ import annotations

import os

import psutil


def _threads(proc: psutil.Process) -> list[int]:
    try:
        return [t.id for t in proc.threads()]
    except psutil.Error:
        return []


def _affinity(tid: int) -> set[int] | None:
    try:
        return set(os.sched_getaffinity(tid))
    except OSError:
        return None


def split_cores(all_cpus: set[int], thread_masks: list[set[int]]) -> tuple[set[int], set[int]]:
    """(worker cores, other cores) from the affinity masks of an engine's threads. A thread
    bound to a strict subset of the machine is a worker's compute thread; the cores left
    over are the ones the other processes may use. Either set is empty when nothing is
    bound or the workers hold every core."""
    worker = set().union(*(m for m in thread_masks if m and m < all_cpus))
    return worker, all_cpus - worker


def pin_engine_processes(root_pid: int | None = None) -> dict:
    """Pin every thread of `root_pid` (default: this process) and of its descendants that
    is not a bound worker thread to the cores the workers do not use. Returns what was
    done, for the benchmark's metadata: {"worker_cores": [...], "other_cores": [...],
    "threads_pinned": n}, or {} where there is nothing to separate."""
    if not hasattr(os, "sched_setaffinity"):
        return {}
    root = psutil.Process(root_pid or os.getpid())
    procs = [root, *root.children(recursive=True)]
    all_cpus = set(os.sched_getaffinity(root.pid))
    masks = {tid: _affinity(tid) for p in procs for tid in _threads(p)}
    worker, other = split_cores(all_cpus, [m for m in masks.values() if m is not None])
    if not worker or not other:
        return {}
    pinned = 0
    for tid, mask in masks.items():
        if mask is None or (mask < all_cpus and mask <= worker):
            continue  # a worker's bound thread, or gone
        try:
            os.sched_setaffinity(tid, other)
            pinned += 1
        except OSError:
            pass  # the thread ended meanwhile
    return {"worker_cores": sorted(worker), "other_cores": sorted(other), "threads_pinned": pinned}


def bound_cores(pid: int | None = None) -> list[int]:
    """The cores that the bound threads of process `pid` (default: this one) may run on:
    those of its threads whose affinity is a strict subset of the machine's cores, as a
    worker's OpenMP threads are after vLLM binds them. [] where no thread is bound."""
    proc = psutil.Process(pid or os.getpid())
    all_cpus = set(range(psutil.cpu_count()))
    worker, _ = split_cores(all_cpus, [m for tid in _threads(proc) if (m := _affinity(tid))])
    return sorted(worker)
