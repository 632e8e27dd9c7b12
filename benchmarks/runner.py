"""Run a command in its own process group and always kill the whole group afterwards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            proc.poll()
            time.sleep(0.1)
        else:
            continue
        break
    proc.poll()


@contextmanager
def process_group(cmd, log_path, env=None):
    """Popen ``cmd`` in a new session (its own process group), output to ``log_path``."""
    log = open(log_path, "w")
    full_env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "0", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True)
    try:
        yield proc
    finally:
        kill_group(proc)
        log.close()


def log_tail(path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def engine_layout(in_process: bool) -> dict:
    """`LLM(...)` keyword arguments for where the engine runs. In process: the engine core
    and its one worker run in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` and
    the `uni` executor). Each spawned process re-imports vLLM (~17 s on 2 cores), so this
    starts ~35 s sooner; for smoke tests, as there is no worker process to pin and no
    inter-process hop to time. Otherwise vLLM's default layout, which users run: nothing set."""
    if not in_process:
        return {}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {"distributed_executor_backend": "uni"}


class WorkerError(RuntimeError):
    pass


def run_worker(spec: dict, work_dir, name: str, timeout_s: float) -> dict:
    """Run `benchmarks.measure` on ``spec`` in its own process group; return its result."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (work / f"{name}.spec.json", work / f"{name}.out.json",
                                     work / f"{name}.log")
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    with process_group([sys.executable, "-m", "benchmarks.measure", str(spec_path),
                        str(out_path)], log_path) as proc:
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise WorkerError(f"{name}: timed out after {timeout_s:.0f} s (log: {log_path})\n"
                              + log_tail(log_path))
    if rc != 0 or not out_path.exists():
        raise WorkerError(f"{name}: exited with {rc} (log: {log_path})\n" + log_tail(log_path))
    return json.loads(out_path.read_text())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_work_dir(tag: str) -> Path:
    return Path(os.environ.get("LAYERSKIP_BENCH_WORK", Path(".cache") / "bench")) / tag


def tmp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
