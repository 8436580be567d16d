"""Client helpers for the tests of ``/v1/sparsity`` against the shared ``sparse_server`` (conftest):
the route, a greedy completion, a concurrent load of short completions, and a restore of the
server's start-up settings (every test that changes p restores them: the server is shared)."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import requests

START = {"p": 0.9, "target": "all_inputs"}  # the sparse_server's start-up settings (conftest)


def route(server) -> str:
    return f"{server.url}/v1/sparsity"


def get_state(server) -> dict:
    r = requests.get(route(server), headers=server.headers, timeout=60)
    r.raise_for_status()
    return r.json()


def post(server, body: dict, timeout: float = 300) -> requests.Response:
    return requests.post(route(server), json=body, headers=server.headers, timeout=timeout)


def restore(server) -> None:
    r = post(server, START)
    assert r.status_code == 200, r.text


def settings(state: dict) -> tuple:
    return state["p"], state["target"]


def complete(server, prompt: str, max_tokens: int, session=None, **extra) -> dict:
    """A greedy completion; raises on an HTTP error."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, **extra}
    r = (session or requests).post(f"{server.url}/v1/completions", json=body,
                                   headers=server.headers, timeout=300)
    r.raise_for_status()
    return r.json()


def cached_tokens(reply: dict) -> int:
    """Prompt tokens served from vLLM's prefix cache (``usage.prompt_tokens_details``, present
    with ``--enable-prompt-tokens-details``, which the sparse_server sets)."""
    details = reply["usage"].get("prompt_tokens_details")
    assert details is not None, "the server must run with --enable-prompt-tokens-details"
    return details.get("cached_tokens") or 0


@dataclass
class LoadResult:
    latencies: list = field(default_factory=list)  # seconds, successful requests
    errors: list = field(default_factory=list)  # (status or exception name, first 200 chars)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    forward_tokens: int = 0  # tokens that went through the model (see run_load)

    def report(self, name: str) -> str:
        lat = sorted(self.latencies)
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else lat * 99
        return (f"{name}: {len(lat) + len(self.errors)} requests, {len(self.errors)} errors, "
                f"latency p50 {q[49]:.2f} s, p99 {q[98]:.2f} s, {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion tokens, {self.cached_tokens} cached")


def run_load(server, seconds: float, streams: int = 32, max_tokens: int = 8,
             until: threading.Event | None = None) -> LoadResult:
    """``streams`` threads, each sending short greedy completions back to back for ``seconds``
    (or, given ``until``, until that event is set).

    Every prompt starts with a unique tag and is shorter than one KV block (128 tokens on CPU), so
    no prompt can hit the prefix cache; ``ignore_eos`` makes every request produce exactly
    ``max_tokens`` tokens. The tokens that go through the model are then known per request:
    prompt + completion - 1 (the last sampled token is returned, never fed back)."""
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def stream(i: int) -> None:
        session = requests.Session()
        n = 0
        while not until.is_set() if until is not None else time.monotonic() < deadline:
            prompt = f"[{i}-{n}] Write one sentence about the number {n * streams + i}:"
            n += 1
            t0 = time.monotonic()
            try:
                reply = complete(server, prompt, max_tokens, session=session, ignore_eos=True)
            except requests.RequestException as e:
                status = getattr(e.response, "status_code", type(e).__name__)
                text = getattr(e.response, "text", str(e)) or str(e)
                with lock:
                    result.errors.append((status, text[:200]))
                continue
            usage = reply["usage"]
            with lock:
                result.latencies.append(time.monotonic() - t0)
                result.prompt_tokens += usage["prompt_tokens"]
                result.completion_tokens += usage["completion_tokens"]
                cached = cached_tokens(reply)
                result.cached_tokens += cached
                result.forward_tokens += (usage["prompt_tokens"] - cached
                                          + usage["completion_tokens"] - 1)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def healthy(server) -> bool:
    return requests.get(f"{server.url}/health", timeout=30).status_code == 200
