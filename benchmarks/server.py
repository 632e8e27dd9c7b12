"""One `vllm serve` on 127.0.0.1: start it in its own process group, wait until it answers
/health, read its Prometheus /metrics and the resident memory of its process tree, and kill
the whole group when done (also on errors and KeyboardInterrupt).

Every call here has a timeout and only ever talks to 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.runner import free_port, log_tail, process_group

HOST = "127.0.0.1"
# No proxy, whatever the environment says: requests go straight to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def vllm_cli() -> list[str]:
    exe = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
    return [exe]


def serve_command(model, port: int, extra_args: list[str]) -> list[str]:
    return vllm_cli() + ["serve", str(model), "--host", HOST, "--port", str(port), *extra_args]


@dataclass
class Server:
    url: str
    proc: object  # subprocess.Popen
    log_path: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the server leads its own group

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_ready(url: str, proc, timeout: float, log_path) -> None:
    """Poll /health until 200; fail early when the process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_tail(log_path)}")
        if health(url, timeout=2) == 200:
            return
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{log_tail(log_path)}")


@contextmanager
def running_server(model, extra_args: list[str], log_path, startup_timeout: float, env=None):
    """Yield a ready `Server`; its whole process group is killed on exit."""
    port = free_port()
    cmd = serve_command(model, port, extra_args)
    with process_group(cmd, log_path, env=env) as proc:
        server = Server(f"http://{HOST}:{port}", proc, Path(log_path))
        wait_ready(server.url, proc, startup_timeout, log_path)
        yield server


def _check_local(url: str) -> None:
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"refusing to talk to {url}: only {HOST} is allowed")


def health(url: str, timeout: float = 5) -> int | None:
    """HTTP status of GET /health, or None when nothing answers."""
    _check_local(url)
    try:
        with _OPENER.open(url + "/health", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {sample name: value summed over label sets}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def metrics(url: str, timeout: float = 10) -> dict[str, float]:
    """The server's /metrics, parsed; empty when the server does not answer."""
    _check_local(url)
    try:
        with _OPENER.open(url + "/metrics", timeout=timeout) as r:
            return parse_metrics(r.read().decode())
    except OSError:
        return {}


def wait_idle(url: str, timeout: float = 60) -> bool:
    """Wait until the engine has no running or waiting request (aborts land asynchronously)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(url)
        if not m:
            return False
        if m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0) == 0:
            return True
        time.sleep(0.5)
    return False


def collective_rpc(url: str, method: str, timeout: float = 30) -> list | None:
    """Call a worker method through the dev route (needs VLLM_SERVER_DEV_MODE=1 on the
    server); one result per worker, or None when the route is missing or the call fails."""
    _check_local(url)
    req = urllib.request.Request(url + "/collective_rpc", method="POST",
                                 data=json.dumps({"method": method, "timeout": timeout}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout + 5) as r:
            return json.loads(r.read().decode()).get("results")
    except (OSError, ValueError):
        return None


def _pgrp(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state, ppid, pgrp, ...
    return int(fields[2]) if len(fields) > 2 else None


def _rss_kib(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0  # a zombie, or gone


def group_rss(pgid: int) -> dict[str, float]:
    """Resident memory (MiB) of each process in the group (API server, EngineCore, workers),
    keyed "pid name"."""
    out = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        if _pgrp(pid) != pgid:
            continue
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        out[f"{pid} {name}"] = _rss_kib(pid) / 1024
    return out


def group_rss_mib(pgid: int) -> float:
    return sum(group_rss(pgid).values())
