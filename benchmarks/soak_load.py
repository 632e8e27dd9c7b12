"""The soak test's load: a fixed list of requests, the same for every server, decided by a
seed (which request gets which prompt, sampling parameters, limits, abort point).

Prompts are cut from held-out standard-library source at token boundaries of the model's
own tokenizer, so their lengths are known: short ones, long ones that need chunked prefill
(more tokens than --max-num-batched-tokens), and ones that share a few long prefixes (prefix
cache hits). Malformed and out-of-range requests are mixed in at fixed positions.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from benchmarks.prompts import heldout_files

STOP_STRINGS = (["\n"], ["e"], [" ("], ["):", "\n\n"])
TOP_P = (0.5, 0.8, 0.95)
TOP_K = (5, 20, 50)
# Request kinds and their shares of the load. "seeded*" carry a `seed` (their output must
# repeat); "top-p" / "top-k" sample without one.
KIND_WEIGHTS = {"greedy": 35, "seeded": 25, "seeded-top-p": 10, "seeded-top-k": 10,
                "top-p": 10, "top-k": 10}
NUM_PREFIXES = 4


@dataclass(frozen=True)
class LoadSettings:
    num_requests: int
    max_tokens: int
    max_model_len: int
    max_num_batched_tokens: int
    block_size: int
    abort_fraction: float = 0.1
    bad_repeats: int = 2
    kinds: tuple = tuple(KIND_WEIGHTS)


@dataclass
class Good:
    """A streamed completion. ``body`` lacks "model" and "stream" (added when sent)."""
    rid: int
    kind: str  # a key of KIND_WEIGHTS
    prompt_kind: str  # short | long | shared-prefix
    prompt_tokens: int
    body: dict
    abort_after: int | None = None  # close the stream after this many chunks


@dataclass
class Bad:
    """A request the server must refuse with a 4xx and a message. ``body`` is sent as is;
    the placeholder MODEL is replaced by the served model name (except for unknown-model)."""
    rid: int
    name: str
    body: str


@dataclass
class Load:
    items: list = field(default_factory=list)  # Good and Bad, in sending order

    @property
    def good(self) -> list[Good]:
        return [x for x in self.items if isinstance(x, Good)]

    @property
    def bad(self) -> list[Bad]:
        return [x for x in self.items if isinstance(x, Bad)]


class TextSource:
    """Token-exact slices of held-out source text."""

    def __init__(self, tokenizer, rng: random.Random, files: int = 24):
        texts = []
        for p in heldout_files()[:files]:
            try:
                texts.append(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
        self.corpus = "\n".join(texts)
        self.tok = tokenizer
        self.rng = rng

    def take(self, n_tokens: int) -> str:
        """About ``n_tokens`` tokens starting at a random line start."""
        start = self.corpus.rfind("\n", 0, self.rng.randrange(len(self.corpus) // 2)) + 1
        window = self.corpus[start:start + 16 * n_tokens + 64]
        enc = self.tok(window, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        end = offsets[min(n_tokens, len(offsets)) - 1][1]
        return window[:end]

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=True)["input_ids"])


def _sampling(kind: str, rng: random.Random) -> dict:
    if kind == "greedy":
        return {"temperature": 0.0}
    body = {"temperature": 0.8}
    if kind.startswith("seeded"):
        body["seed"] = rng.randrange(1 << 31)
    if kind.endswith("top-p"):
        body["top_p"] = rng.choice(TOP_P)
    elif kind.endswith("top-k"):
        body["top_k"] = rng.choice(TOP_K)  # vLLM's extra field
    return body


def _prompt(src: TextSource, prefixes: list[str], s: LoadSettings, rng: random.Random):
    """(prompt kind, text) within max_model_len - max_tokens."""
    room = s.max_model_len - s.max_tokens - 16  # margin for tokenizer drift and BOS
    roll = rng.random()
    if roll < 0.15 and room > s.max_num_batched_tokens + 32:
        return "long", src.take(rng.randint(s.max_num_batched_tokens + 24, room))
    if roll < 0.55:
        return "shared-prefix", rng.choice(prefixes) + src.take(rng.randint(4, 24))
    return "short", src.take(rng.randint(8, min(96, room)))


def _good(rid: int, src, prefixes, s: LoadSettings, rng: random.Random, aborts: bool) -> Good:
    kind = rng.choices(s.kinds, weights=[KIND_WEIGHTS[k] for k in s.kinds])[0]
    prompt_kind, prompt = _prompt(src, prefixes, s, rng)
    body = {"prompt": prompt, "max_tokens": rng.randint(max(1, s.max_tokens // 4), s.max_tokens),
            **_sampling(kind, rng)}
    abort_after = None
    if aborts:
        abort_after = rng.randint(1, 3)
        body.update(max_tokens=s.max_tokens, ignore_eos=True)  # still running when dropped
    elif rng.random() < 0.3:
        body["stop"] = rng.choice(STOP_STRINGS)
    elif rng.random() < 0.3:
        body["ignore_eos"] = True
    return Good(rid, kind, prompt_kind, src.count(prompt), body, abort_after)


def bad_bodies(src: TextSource, s: LoadSettings) -> dict[str, str]:
    ok = {"model": "MODEL", "prompt": "def main():\n", "max_tokens": 4}
    too_long = src.take(s.max_model_len + 64)
    return {
        "invalid-json": '{"model": "MODEL", "prompt": "def f(", "max_tokens": ',
        "negative-max-tokens": json.dumps({**ok, "max_tokens": -1}),
        "prompt-too-long": json.dumps({**ok, "prompt": too_long}),
        "unknown-model": json.dumps({**ok, "model": "no-such-model-soak"}),
        "negative-temperature": json.dumps({**ok, "temperature": -0.5}),
    }


def build_load(tokenizer, s: LoadSettings, seed: int) -> Load:
    """Deterministic from ``seed`` (and the tokenizer and settings)."""
    rng = random.Random(seed)
    src = TextSource(tokenizer, rng)
    prefix_len = max(2 * s.block_size + 8, 64)
    prefixes = [src.take(min(prefix_len, s.max_model_len // 3)) for _ in range(NUM_PREFIXES)]
    aborting = set(rng.sample(range(s.num_requests), round(s.abort_fraction * s.num_requests)))
    goods = [_good(i, src, prefixes, s, rng, i in aborting) for i in range(s.num_requests)]
    bads = [(name, body) for name, body in bad_bodies(src, s).items()] * s.bad_repeats
    slots = sorted(rng.choices(range(len(goods) + 1), k=len(bads)))  # where each one is sent
    items, bi = [], 0
    for pos in range(len(goods) + 1):
        while bi < len(bads) and slots[bi] == pos:
            items.append(Bad(s.num_requests + bi, *bads[bi]))
            bi += 1
        if pos < len(goods):
            items.append(goods[pos])
    return Load(items)


def describe(load: Load, s: LoadSettings) -> dict:
    """Counts of what the load contains, for the report."""
    good = load.good
    count = lambda pred: sum(1 for g in good if pred(g))  # noqa: E731
    return {
        "requests": len(load.items), "streamed": len(good), "bad": len(load.bad),
        "kinds": {k: count(lambda g, k=k: g.kind == k) for k in KIND_WEIGHTS},
        "long_prompts": count(lambda g: g.prompt_tokens > s.max_num_batched_tokens),
        "shared_prefix_prompts": count(lambda g: g.prompt_kind == "shared-prefix"),
        "stop_strings": count(lambda g: "stop" in g.body),
        "planned_aborts": count(lambda g: g.abort_after is not None),
        "max_prompt_tokens": max((g.prompt_tokens for g in good), default=0),
    }
