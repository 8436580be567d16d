"""The demo server under load, with p and target changed at runtime (``POST /v1/sparsity``).

Loopback only, on the session's shared ``sparse_server`` (conftest); every test restores p and
target. The counts the tests check come from the server's own answers: ``usage`` (prompt,
completion and prefix-cached tokens of each request) and the route's per-layer counters.
"""

from __future__ import annotations

import json
import threading
import time

import requests
from route_client import (START, cached_tokens, complete, get_state, healthy, post, restore,
                          route, run_load, settings)

LOAD_S = 20  # the plain load: every stream completes several requests
FLIP_LOAD_S = 12  # the load with flips: MIN_FLIPS changes at least
FLIP_EVERY_S = 2.0
MIN_FLIPS = 3  # the load lasts longer where the machine is too slow for them in FLIP_LOAD_S
FLIPS = [(0.5, "all_inputs"), (0.8, "intermediate"), (0.95, "input"), (0.7, "all_inputs")]
BLOCK_TOKENS = 128  # vLLM's KV block size on CPU: only whole blocks are prefix-cached


def layer_widths(demo_model) -> dict[str, int]:
    """Inputs per token at each site: hidden size (gate_up_proj's input) and intermediate size
    (down_proj's input), from the checkpoint's config."""
    cfg = json.loads((demo_model / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return {"input": cfg["hidden_size"], "intermediate": cfg["intermediate_size"]}


def counter_growth(before: dict, after: dict) -> dict[tuple, int]:
    """Per (layer, site): growth of ``total`` between two GETs."""
    return {(a["layer"], a["site"]): a["total"] - b["total"]
            for a, b in zip(after["layers"], before["layers"], strict=True)}


def test_load_counts_every_token_once(sparse_server, demo_model):
    """32 streams of short completions for 20 s: no error, and every layer's counter grows by
    exactly (tokens through the model) x (the site's width)."""
    widths = layer_widths(demo_model)
    before = get_state(sparse_server)
    result = run_load(sparse_server, LOAD_S)
    after = get_state(sparse_server)
    print("\n" + result.report("load"))
    assert result.errors == []
    assert len(result.latencies) > 32 and result.cached_tokens == 0
    growth = counter_growth(before, after)
    assert len(growth) == 36
    expected = {key: result.forward_tokens * widths[key[1]] for key in growth}
    assert growth == expected
    zeroed = sum(a["zeroed"] - b["zeroed"] for a, b in zip(after["layers"], before["layers"]))
    assert 0 < zeroed < sum(growth.values())


# A prompt of several KV blocks that no load request shares (they are all under one block).
PROBE = "Probe: " + " ".join(f"item {i} is blue," for i in range(60))


def test_flips_under_load_never_serve_kv_from_another_p(sparse_server):
    """The same load while p and target change every 2 s (for 12 s and at least 3 changes: each
    POST waits for the requests in flight, each probe for its turn): no error, every POST answers
    its own change, the server is healthy after, and no request is served from prefix-cache
    blocks computed at another p.

    Observation: after each change a probe request sends ``PROBE`` plus a new ending; the whole
    blocks of ``PROBE`` were computed (and left in the prefix cache) by the previous probe, before
    the change, so the probe must find nothing cached (``usage.prompt_tokens_details.
    cached_tokens`` == 0). Once, a second request right after the probe must hit the probe's
    blocks: proof that the cache is on and observed."""
    loads, stale, posts, done = [], [], [], threading.Event()
    loader = threading.Thread(target=lambda: loads.append(run_load(sparse_server, 0, until=done)))
    t_end = time.monotonic() + FLIP_LOAD_S - FLIP_EVERY_S
    loader.start()
    try:
        time.sleep(FLIP_EVERY_S)  # let the streams fill the batch
        warm = complete(sparse_server, PROBE + " Start", 1)
        assert warm["usage"]["prompt_tokens"] > 2 * BLOCK_TOKENS
        while time.monotonic() < t_end or len(posts) < MIN_FLIPS:
            p, target = FLIPS[len(posts) % len(FLIPS)]
            t0 = time.monotonic()
            r = post(sparse_server, {"p": p, "target": target})
            posts.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
            assert settings(r.json()) == (p, target)
            probe = cached_tokens(complete(sparse_server, PROBE + f" Flip {len(posts)}", 1))
            if probe:
                stale.append(f"flip {len(posts)} to p={p}, {target}: {probe} prompt tokens "
                             "served from blocks computed before the change")
            if len(posts) == 1:  # the cache is on and observed: a hit on the probe's blocks
                again = complete(sparse_server, PROBE + " Again", 1)
                assert cached_tokens(again) >= 2 * BLOCK_TOKENS
            time.sleep(max(0.0, FLIP_EVERY_S - (time.monotonic() - t0)))
    finally:
        done.set()
        loader.join()
        restore(sparse_server)
    result = loads[0]
    print("\n" + result.report(f"load with {len(posts)} flips") + ", POST took "
          + ", ".join(f"{s:.1f}" for s in posts) + " s")
    print("\n".join(stale))
    assert stale == []
    assert result.errors == []
    assert healthy(sparse_server)
    assert settings(get_state(sparse_server)) == (START["p"], START["target"])


def test_greedy_output_is_deterministic_before_and_after_flips(sparse_server):
    prompt, fixed = "The three most important inventions in history are", 0.6

    def five_runs() -> list[str]:
        assert post(sparse_server, {"p": fixed, "target": "all_inputs"}).status_code == 200
        return [complete(sparse_server, prompt, 12)["choices"][0]["text"] for _ in range(5)]

    try:
        before = five_runs()
        for p, target in FLIPS:
            assert post(sparse_server, {"p": p, "target": target}).status_code == 200
            complete(sparse_server, prompt, 4)
        after = five_runs()
    finally:
        restore(sparse_server)
    assert len(set(before)) == 1 and before[0].strip()
    assert after == before


def stream_text(server, prompt: str, max_tokens: int, started: threading.Event, out: dict):
    """A streamed greedy completion: sets ``started`` at its first token (the request is then
    running in the engine); fills ``out`` with its text and the time it ended."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True}
    text = []
    with requests.post(f"{server.url}/v1/completions", json=body, headers=server.headers,
                       stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            text.append(json.loads(line[6:])["choices"][0]["text"])
            started.set()
    out["text"], out["end"] = "".join(text), time.monotonic()


def test_a_request_in_flight_finishes_at_the_p_it_started_with(sparse_server):
    """POST waits for the request in flight, which ends exactly as a run at the old p alone;
    a request sent after the POST runs at the new p."""
    prompt, n, old, new = "Once upon a time, in a small village by the sea,", 24, 0.5, 1.0

    def alone(p: float) -> str:
        assert post(sparse_server, {"p": p}).status_code == 200
        return complete(sparse_server, prompt, n, ignore_eos=True)["choices"][0]["text"]

    try:
        at_old, at_new = alone(old), alone(new)
        assert at_old != at_new  # else this test could not tell the two p apart
        assert post(sparse_server, {"p": old}).status_code == 200
        started, out = threading.Event(), {}
        flight = threading.Thread(target=stream_text,
                                  args=(sparse_server, prompt, n, started, out))
        flight.start()
        assert started.wait(120)
        r = post(sparse_server, {"p": new})
        posted = time.monotonic()
        assert r.status_code == 200, r.text
        after = complete(sparse_server, prompt, n, ignore_eos=True)["choices"][0]["text"]
        flight.join(300)
    finally:
        restore(sparse_server)
    assert out["text"] == at_old  # the request in flight kept its p to the end
    assert out["end"] <= posted  # the POST answered only after it had finished
    assert after == at_new
    assert requests.get(route(sparse_server), headers=sparse_server.headers).json()["p"] == 0.9
