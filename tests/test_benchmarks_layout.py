"""benchmarks.layout with fake engines: which engine each life starts, and ratios taken
within a round (no vLLM engine)."""
import collections
import json

import pytest

from benchmarks import layout
from benchmarks.affinity import bound_cores


def test_every_engine_lives_once_a_round_odd_rounds_reversed():
    order = layout.lives(2)
    first, second = order[:6], order[6:]
    assert sorted(first) == sorted((lay, sys_) for lay in layout.LAYOUTS for sys_ in layout.SYSTEMS)
    assert second == first[::-1]


def test_layout_ratios_are_taken_within_a_round(monkeypatch, tmp_path):
    # Seconds per run: the in-process layout is 2x faster, LayerSkip 1.25x faster than plain,
    # and in the second round the default layout's lives run 3x slower (a noisy minute).
    # In-process over default is then 2x and 6x within the rounds: median 4x. The ratio of
    # the medians of tokens/s over the rounds would say 3x.
    started, lives_of = [], collections.Counter()

    class FakeEngine:
        def __init__(self, engine_args, max_tokens, env=None):
            self.layerskip, self.in_process = engine_args[3], engine_args[7]
            key = (self.layerskip is not None, json.dumps(env), self.in_process)
            self.round, lives_of[key] = lives_of[key], lives_of[key] + 1
            self.default = not env and not self.in_process
            started.append((self.layerskip, env, self.in_process))
            threads = 1 if not env and not self.in_process else 2
            self.worker = {"torch_threads": threads, "bound_cores": [0] if threads == 1 else []}

        def run(self, batch, mode):
            assert mode == ("adaptive" if self.layerskip else None)
            seconds = 1.0 * (0.5 if self.in_process else 1.0) * (0.8 if self.layerskip else 1.0)
            return {"seconds": seconds * (3.0 if self.round and self.default else 1.0)}

        def close(self):
            pass

    monkeypatch.setattr(layout, "EngineProcess", FakeEngine)
    monkeypatch.setattr(layout, "resolve_spec", lambda model, e, k: (2, 2))
    out, md = tmp_path / "layout.json", tmp_path / "layout.md"
    assert layout.main(["--model", "m", "--batch-sizes", "1,4", "--rounds", "2", "--repeats", "1",
                        "--max-tokens", "10", "--json", str(out), "--md", str(md)]) == 0
    # Each layout's environment and process layout reached its engines.
    assert {(env.get("VLLM_CPU_NUM_OF_RESERVED_CPU") if env else None, in_proc)
            for _, env, in_proc in started} == {(None, False), ("0", False), (None, True)}
    assert len(started) == 12
    rows = {(r["batch_size"], r["layout"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 6
    fast = rows[(4, "in-process")]
    assert fast["vllm_vs_default"] == pytest.approx(4.0)
    assert fast["layerskip_vs_default"] == pytest.approx(4.0)
    assert fast["layerskip_vs_vllm"] == pytest.approx(1.25)
    assert rows[(1, "no-reserved-core")]["vllm_vs_default"] == pytest.approx(2.0)  # 1x and 3x
    assert rows[(1, "default")]["layerskip_vs_vllm"] == pytest.approx(1.25)
    # tokens/s: the median over the rounds (4 x 10 tokens in 0.5 s both times).
    assert fast["vllm_tokens_per_s"] == pytest.approx(80.0)
    text = md.read_text()
    assert "| 4 | in-process | 2 / not bound | 80.0 | 4.00x |" in text
    assert "| 1 | default | 1 / 0 |" in text


def test_bound_cores_sees_a_thread_bound_to_part_of_the_machine():
    import os

    import psutil
    if psutil.cpu_count() < 2 or not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs two cores and sched_setaffinity")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {0})
        assert bound_cores() == [0]
    finally:
        os.sched_setaffinity(0, before)


def test_engine_process_sets_its_layout_before_the_engine_starts(monkeypatch):
    import os

    from benchmarks import overhead
    for key in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_ALLOW_INSECURE_SERIALIZATION",
                "VLLM_USE_V2_MODEL_RUNNER"):
        monkeypatch.setenv(key, "before")  # restored after the test
    seen = {}

    class FakeLLM:
        def collective_rpc(self, method):
            return [method()]

        class llm_engine:
            class engine_core:
                shutdown = staticmethod(lambda: seen.setdefault("shut down", True))

    def fake_start(*engine_args):
        seen["reserved"] = os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"]
        return FakeLLM()

    class Conn:
        sent = []

        def send(self, message):
            self.sent.append(message)

        def recv(self):
            return None  # no runs: stop at once

    monkeypatch.setattr(overhead, "start", fake_start)
    overhead.serve(Conn(), ("m", 2, 2, None, 1, "float32", True, False), 8,
                   env=dict(layout.LAYOUTS["no-reserved-core"][0]))
    assert seen == {"reserved": "0", "shut down": True}
    status, pinned, worker = Conn.sent[0]
    assert status == "ready" and worker["torch_threads"] >= 1 and isinstance(worker["bound_cores"], list)
