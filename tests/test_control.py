"""The ``/v1/sparsity`` route (vllm_sparsity/control.py): its change protocol on a fake engine
(no server), then bad bodies, the API key and path variants against the shared ``sparse_server``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from types import SimpleNamespace

import pytest
from route_client import START, complete, get_state, healthy, post, restore, settings

from vllm_sparsity import config, control, worker_rpc
from vllm_sparsity.config import SparsityConfig
from vllm_sparsity.state import RuntimeState

# ---------------------------------------------------------------- the protocol, on a fake engine


class FakeEngine:
    """The ``EngineClient`` calls the route makes, over real ``RuntimeState`` objects driven by
    the real worker methods (``worker_rpc.WORKER_METHODS``). ``log`` records the calls in order.

    drain_s: how long ``pause_generation`` takes (requests in flight finishing);
    pause_error / reset_ok / deaf: a pause that raises, a prefix-cache reset that returns False,
    worker ranks that ignore ``vllm_sparsity_set``."""

    def __init__(self, workers=2, drain_s=0.0, pause_error=None, reset_ok=True, deaf=(),
                 config=SparsityConfig(p=0.9), resolved_backend="torch"):
        self.states = [RuntimeState(config, "cpu", 4) for _ in range(workers)]
        for state in self.states:
            state.backend = resolved_backend
        self.wrappers = [SimpleNamespace(worker=SimpleNamespace(model_runner=SimpleNamespace(
            get_model=lambda s=s: SimpleNamespace(_vllm_sparsity=s)))) for s in self.states]
        self.drain_s, self.pause_error, self.reset_ok, self.deaf = \
            drain_s, pause_error, reset_ok, set(deaf)
        self.paused, self.log = False, []

    async def pause_generation(self, *, mode, clear_cache):
        assert (mode, clear_cache) == ("wait", True)
        self.log.append("pause")
        self.paused = True
        await asyncio.sleep(self.drain_s)
        if self.pause_error:
            raise self.pause_error
        self.log.append("paused")

    async def resume_generation(self):
        self.log.append("resume")
        self.paused = False

    async def is_paused(self):
        return self.paused

    async def reset_prefix_cache(self):
        self.log.append("reset")
        return self.reset_ok

    async def collective_rpc(self, method, timeout=None, args=()):
        replies = []
        for rank, wrapper in enumerate(self.wrappers):
            await asyncio.sleep(0)  # let other requests' coroutines interleave
            if method == "vllm_sparsity_set":
                assert self.paused, "p changed while the engine was not paused"
                self.log.append(f"set {args}")
                if rank in self.deaf:
                    replies.append(self.states[rank].settings())
                    continue
            replies.append(worker_rpc.WORKER_METHODS[method](wrapper, *args))
        return replies


def app_for(engine, drain_timeout_s=5.0):
    from fastapi import FastAPI

    app, endpoint = FastAPI(), control.SparsityEndpoint()
    endpoint.attach_router(app)
    asyncio.run(endpoint.init_state(engine, app.state, None))
    endpoint.drain_timeout_s = drain_timeout_s
    return app


async def send(app, *requests_):
    """Send ``(method, body, headers)`` requests to the app concurrently; returns the replies."""
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        return await asyncio.gather(*[
            client.request(method, "/v1/sparsity", content=body,
                           headers={"content-type": "application/json", **headers})
            for method, body, headers in requests_])


def post_json(app, body):
    return asyncio.run(send(app, ("POST", json.dumps(body), {})))[0]


def test_concurrent_posts_are_applied_one_at_a_time_and_each_reply_shows_its_own():
    engine = FakeEngine()
    app = app_for(engine)
    ps = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    replies = asyncio.run(send(app, *[("POST", json.dumps({"p": p}), {}) for p in ps]))
    assert [r.status_code for r in replies] == [200] * len(ps)
    assert [r.json()["p"] for r in replies] == ps
    # Each change: pause (drained) -> reset confirmed -> set -> resume, never interleaved.
    expected = []
    for p in ps:
        expected += ["pause", "paused", "reset", f"set ({p}, None)", f"set ({p}, None)", "resume"]
    assert engine.log == expected
    assert not engine.paused


def test_a_drain_that_times_out_changes_nothing_and_resumes():
    engine = FakeEngine(drain_s=1.0)
    r = post_json(app_for(engine, drain_timeout_s=0.05), {"p": 0.5})
    assert r.status_code == 503
    assert "did not finish within 0.05 s (VLLM_SPARSITY_DRAIN_TIMEOUT_S)" in r.json()["error"]
    assert engine.log == ["pause", "resume"] and not engine.paused
    assert [s.config.p for s in engine.states] == [0.9, 0.9]


@pytest.mark.parametrize("engine, message", [
    (FakeEngine(pause_error=RuntimeError("Failed to reset the KV connector cache.")),
     "could not pause and clear its caches (RuntimeError: Failed to reset the KV connector"),
    (FakeEngine(reset_ok=False), "could not confirm an empty prefix cache"),
])
def test_an_unconfirmed_cache_reset_is_an_error_and_changes_nothing(engine, message):
    r = post_json(app_for(engine), {"p": 0.5})
    assert r.status_code == 500 and message in r.json()["error"]
    assert engine.log[-1] == "resume" and not engine.paused
    assert not any(e.startswith("set") for e in engine.log)
    assert [s.config.p for s in engine.states] == [0.9, 0.9]


def test_a_worker_that_did_not_take_the_change_is_reported():
    engine = FakeEngine(workers=3, deaf={1})
    r = post_json(app_for(engine), {"p": 0.5, "target": "input"})
    assert r.status_code == 500
    assert "workers [1] did not take p=0.5, target=input" in r.json()["error"]
    assert engine.log[-1] == "resume"


def test_an_engine_paused_by_someone_else_is_left_paused():
    engine = FakeEngine()
    engine.paused = True
    r = post_json(app_for(engine), {"p": 0.5})
    assert r.status_code == 409 and "paused by another caller" in r.json()["error"]
    assert engine.paused and engine.log == []


def test_get_passes_on_what_the_merge_reports_of_disagreeing_workers(monkeypatch):
    from vllm_sparsity import counters

    merge = counters.merge

    def disagreeing(snaps):
        merged = merge(snaps)
        return {**merged, "settings": {**merged["settings"], "disagreement": [1]},
                "unknown_phase_tokens": 3}

    monkeypatch.setattr(counters, "merge", disagreeing)
    r = asyncio.run(send(app_for(FakeEngine()), ("GET", "", {})))[0]
    assert r.status_code == 200 and r.json()["p"] == 0.9
    assert (r.json()["disagreement"], r.json()["unknown_phase_tokens"]) == ([1], 3)


def test_get_shows_the_rule_and_q():
    engine = FakeEngine(config=SparsityConfig(p=0.9, rule="lq", q=2.0))
    r = asyncio.run(send(app_for(engine), ("GET", "", {})))[0]
    assert r.status_code == 200
    assert (r.json()["rule"], r.json()["q"], r.json()["p"]) == ("lq", 2.0, 0.9)


@pytest.mark.parametrize("config, backend, body, message", [
    (SparsityConfig(p=0.9), "torch", {"rule": "max-p"},
     "rule cannot change at runtime: the rule is compiled into the model's graph; restart with "
     "--sparsity-rule max-p to run max-p (this server runs top-p)"),
    (SparsityConfig(p=0.9), "cpu", {"p": 0.5, "rule": "top-k"},
     "rule cannot change at runtime: the cpu backend serving this model implements the top-p "
     "rule only, and the rule is compiled"),
    (SparsityConfig(p=0.9, rule="lq", q=2.0, backend="torch"), "torch", {"q": 3.0},
     "restart with --sparsity-rule lq to run lq (q=3)"),
    (SparsityConfig(p=0.9), "torch", {"p": 0}, "p must be a number in [1e-06, 1], got 0.0"),
    (SparsityConfig(p=0.9), "torch", {"q": 2.0},
     "q is the exponent of the lq rule only; rule is top-p"),
    (SparsityConfig(p=0.9), "torch", {"rule": "lq"}, "rule lq needs q"),
    (SparsityConfig(p={"input": 0.9, "intermediate": 0.8}), "torch", {"target": "input"},
     "p gives p for the sites input, intermediate but target input has the sites input"),
    (SparsityConfig(p=0.9, target="input"), "torch", {"target": "all_inputs"},
     "target must name installed sites (input) on this server"),
    (SparsityConfig(p=0.9), "torch", {"target": "gate,intermediate"},
     "target must name installed sites (input, intermediate)"),
])
def test_changes_the_server_cannot_take_are_refused_before_pausing(config, backend, body,
                                                                   message):
    engine = FakeEngine(config=config, resolved_backend=backend)
    r = post_json(app_for(engine), body)
    assert r.status_code == 400 and message in r.json()["error"], r.json()
    assert engine.log == [] and [s.config for s in engine.states] == [config, config]


def test_repeating_the_rule_is_accepted_and_p_per_site_reaches_every_worker():
    engine = FakeEngine(config=SparsityConfig(p=0.9, rule="lq", q=2.0))
    r = post_json(app_for(engine), {"p": {"input": 0.7, "intermediate": 0.6}, "rule": "lq"})
    assert r.status_code == 200, r.json()
    assert r.json()["p"] == {"input": 0.7, "intermediate": 0.6}
    assert [s.p_by_site() for s in engine.states] == [{"input": 0.7, "intermediate": 0.6}] * 2
    assert [s.p["intermediate"].item() for s in engine.states] == [0.6, 0.6]
    # Back to one p and one site: the other site keeps every nonzero (p = 1 for lq).
    r = post_json(app_for(engine), {"p": 0.5, "target": "intermediate", "q": 2.0})
    assert r.status_code == 200, r.json()
    assert engine.states[0].p_by_site() == {"input": 1.0, "intermediate": 0.5}


def test_a_site_outside_the_target_keeps_every_nonzero_under_max_p():
    engine = FakeEngine(config=SparsityConfig(p=0.9, rule="max-p"))
    assert post_json(app_for(engine), {"target": "input"}).status_code == 200
    # max-p at 1 would keep only the max: 0 is its keep-everything p (rule.KEEP_ALL_P).
    assert engine.states[1].p_by_site() == {"input": 0.9, "intermediate": 0.0}
    # And the route takes it (under max-p only: see the refusals above): rollback to dense.
    assert post_json(app_for(engine), {"p": 0, "target": "all_inputs"}).json()["p"] == 0.0
    assert [s.p_by_site() for s in engine.states] == [{"input": 0.0, "intermediate": 0.0}] * 2
    assert control.validate({"p": 0}) == (0.0, None, None, None)


@pytest.mark.parametrize("headers, body, status, message", [
    ({"content-type": "text/plain"}, '{"p": 0.5}', 415,
     "Content-Type must be application/json, got 'text/plain'"),
    ({"content-type": "application/x-www-form-urlencoded"}, "p=0.5", 415, "Content-Type must be"),
    ({"content-type": "application/jsonx"}, '{"p": 0.5}', 415, "Content-Type must be"),
    ({}, " " * 4097, 413, "body must be at most 4096 bytes"),
    ({}, "[" * 2000 + "]" * 2000, 400, "body must be a JSON object (nested too deeply)"),
    ({}, '{"p": ' + "[" * 2000 + "]" * 2000 + "}", 400, "(nested too deeply)"),
    ({}, b'{"p": 0.5\xff}', 400, "body must be a JSON object ('utf-8' codec can't decode"),
    ({}, "{p: 0.5}", 400, "body must be a JSON object (Expecting property name"),
    ({}, '{"p": null}', 400, "p must be a number in [1e-06, 1], got None"),
])
def test_bodies_refused_before_the_engine_is_touched(headers, body, status, message):
    engine = FakeEngine()
    app = app_for(engine)
    headers = {"content-type": "application/json", **headers}
    r = asyncio.run(send(app, ("POST", body, headers)))[0]
    assert r.status_code == status and message in r.json()["error"], r.text
    assert len(r.content) < 400  # a short prefix of the body at most
    assert engine.log == []


def test_json_with_a_charset_is_json():
    engine = FakeEngine()
    r = asyncio.run(send(app_for(engine), (
        "POST", '{"p": 0.5}', {"content-type": "Application/JSON; charset=utf-8"})))[0]
    assert r.status_code == 200 and r.json()["p"] == 0.5


@pytest.mark.parametrize("body, message", [
    ({}, 'body must be a JSON object with "p" (a number in [1e-06, 1] or {site: p}) and/or '
         '"target"'),
    ([], "body must be a JSON object"),
    (None, "body must be a JSON object"),
    (0.5, "body must be a JSON object"),
    ("0.5", "body must be a JSON object"),
    ({"top_p": 0.5}, "unknown key(s) ['top_p']"),
    ({"p": 0.5, "extra": 1}, "unknown key(s) ['extra']"),
    ({"p": None}, "p must be a number in [1e-06, 1], got None"),
    ({"p": -0.5}, "p must be a number in [1e-06, 1], got -0.5"),
    ({"p": 1.5}, "p must be a number in [1e-06, 1], got 1.5"),
    ({"p": 5e-324}, "p must be a number in [1e-06, 1], got 5e-324"),
    ({"p": 9.9e-7}, "p must be a number in [1e-06, 1], got 9.9e-07"),
    ({"p": float("nan")}, "p must be a number in [1e-06, 1], got nan"),
    ({"p": float("inf")}, "p must be a number in [1e-06, 1], got inf"),
    ({"p": "0.5"}, "p must be a number in [1e-06, 1], got '0.5'"),
    ({"p": True}, "p must be a number in [1e-06, 1], got True"),
    ({"p": [0.5]}, "p must be a number in [1e-06, 1], got [0.5]"),
    ({"p": {"value": 0.5}}, "p: unknown site 'value'; sites: input, gate, up, intermediate"),
    ({"p": {"input": 1.5}}, "p[input] must be a number in [1e-06, 1], got 1.5"),
    ({"p": {"input": "0.5"}}, "p[input] must be a number in [1e-06, 1], got '0.5'"),
    ({"p": {}}, "p must name at least one site of input, gate, up, intermediate"),
    ({"target": "gate,mlp"}, "target must be one of input, intermediate, all_inputs or a comma "
                             "list of sites (input,gate,up,intermediate); got 'gate,mlp'"),
    ({"rule": "top-q"}, "rule must be one of top-p, top-k, max-p, lq; got 'top-q'"),
    ({"rule": None}, "rule must be one of top-p, top-k, max-p, lq; got None"),
    ({"q": 0}, "q must be a finite number > 0 (the L_q exponent), got 0"),
    ({"q": "2"}, "q must be a finite number > 0 (the L_q exponent), got '2'"),
    ({"target": None}, "target must be one of input, intermediate, all_inputs or a comma list "
                       "of sites (input,gate,up,intermediate); got None"),
    ({"target": "output"}, "all_inputs or a comma list of sites (input,gate,up,intermediate); "
                           "got 'output'"),
    ({"target": ""}, "target must be one of input, intermediate, all_inputs or a comma list of sites (input,gate,up,intermediate); got ''"),
    ({"target": 1}, "target must be one of input, intermediate, all_inputs or a comma list of sites (input,gate,up,intermediate); got 1"),
    ({"target": ["input"]}, "target must be one of input, intermediate, all_inputs or a comma list of sites (input,gate,up,intermediate); got ['in"),
    ({"p": 0.5, "target": "x" * 3000}, "got 'xxxxxxxx"),
])
def test_validate_names_the_field_and_the_allowed_values(body, message):
    with pytest.raises(config.SparsityConfigError) as e:
        control.validate(body)
    assert message in str(e.value) and len(str(e.value)) < 260


# ---------------------------------------------------------------- against the shared server

BAD_BODIES = [  # (what, raw body, Content-Type, status, message naming the field)
    ("p null", '{"p": null}', "application/json", 400, "p must be a number in [1e-06, 1]"),
    ("target null", '{"target": null}', "application/json", 400, "target must be one of"),
    ("empty object", "{}", "application/json", 400, "body must be a JSON object with \"p\""),
    ("array", "[0.5]", "application/json", 400, "body must be a JSON object"),
    ("JSON null", "null", "application/json", 400, "body must be a JSON object"),
    ("bare number", "0.5", "application/json", 400, "body must be a JSON object"),
    ("p 0", '{"p": 0}', "application/json", 400, "p must be a number in [1e-06, 1], got 0"),
    ("p 1.5", '{"p": 1.5}', "application/json", 400, "p must be a number in [1e-06, 1]"),
    ("p -0.1", '{"p": -0.1}', "application/json", 400, "p must be a number in [1e-06, 1]"),
    ("p 5e-324", '{"p": 5e-324}', "application/json", 400, "got 5e-324"),
    ("p 1e-7", '{"p": 1e-7}', "application/json", 400, "got 1e-07"),
    ("p NaN", '{"p": NaN}', "application/json", 400, "got nan"),
    ("p Infinity", '{"p": Infinity}', "application/json", 400, "got inf"),
    ("p 1e999", '{"p": 1e999}', "application/json", 400, "got inf"),
    ("p string", '{"p": "0.5"}', "application/json", 400, "got '0.5'"),
    ("p true", '{"p": true}', "application/json", 400, "got True"),
    ("p list", '{"p": [0.5]}', "application/json", 400, "got [0.5]"),
    ("p object", '{"p": {"v": 0.5}}', "application/json", 400, "p: unknown site 'v'"),
    ("target unknown", '{"target": "output"}', "application/json", 400,
     "target must be one of input, intermediate, all_inputs or a comma list of sites (input,gate,up,intermediate); got 'output'"),
    ("target number", '{"target": 5}', "application/json", 400, "target must be one of"),
    ("target long", '{"target": "' + "x" * 3000 + '"}', "application/json", 400,
     "(3002 characters)"),
    ("unknown key", '{"top_p": 0.5}', "application/json", 400, "unknown key(s) ['top_p']"),
    ("extra key", '{"p": 0.5, "x": 1}', "application/json", 400, "unknown key(s) ['x']"),
    ("duplicate key", '{"p": 0.5, "p": 2}', "application/json", 400, "got 2"),
    ("deep nesting", "[" * 2000 + "]" * 2000, "application/json", 400, "(nested too deeply)"),
    ("deep p", '{"p": ' + "[" * 1500 + "]" * 1500 + "}", "application/json", 400,
     "(nested too deeply)"),
    ("not JSON", "{p: 0.5}", "application/json", 400, "body must be a JSON object (Expecting"),
    ("bad UTF-8", b'{"p": "\xff"}', "application/json", 400, "'utf-8' codec can't decode"),
    ("empty body", "", "application/json", 400, "body must be a JSON object (Expecting value"),
    ("5 KB body", '{"p": 0.5, "pad": "' + "x" * 5000 + '"}', "application/json", 413,
     "body must be at most 4096 bytes"),
    ("1 MB body", "x" * 1_000_000, "application/json", 413, "body must be at most 4096 bytes"),
    ("text/plain", '{"p": 0.5}', "text/plain", 415,
     "Content-Type must be application/json, got 'text/plain'"),
    ("form", "p=0.5", "application/x-www-form-urlencoded", 415, "Content-Type must be"),
    ("no Content-Type", '{"p": 0.5}', None, 415, "Content-Type must be application/json, got None"),
]


def raw_request(server, method: str, path: str, body: bytes | str = b"",
                headers: dict | None = None) -> tuple[int, bytes]:
    """One HTTP request with the path sent exactly as given (``requests`` would normalise it)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        body = body.encode() if isinstance(body, str) else body
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def unchanged_and_serving(server) -> None:
    assert settings(get_state(server)) == (START["p"], START["target"])
    assert healthy(server)
    assert complete(server, "Hello", 1)["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("what, body, content_type, status, message", BAD_BODIES,
                         ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_4xx_naming_the_field_and_change_nothing(
        sparse_server, what, body, content_type, status, message):
    headers = dict(sparse_server.headers)
    if content_type:
        headers["Content-Type"] = content_type
    got, reply = raw_request(sparse_server, "POST", "/v1/sparsity", body, headers)
    print(f"\n{what}: {got} {reply[:160].decode(errors='replace')}")
    assert got == status and message in json.loads(reply)["error"], reply[:300]
    assert len(reply) < 400  # never the body echoed back
    unchanged_and_serving(sparse_server)


KEYLESS_HEADERS = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "test-key"},
    {"Authorization": "Basic test-key"},
    {"Authorization": "Token test-key"},
    {"Authorization": "Bearer  test-key"},
    {"Authorization": "Bearer test-keyx"},
    {"Authorization": "Bearer test-key, Bearer test-key"},
    {"Authorization": "Bearer TEST-KEY"},
    {"X-API-Key": "test-key"},
    {"Api-Key": "test-key"},
    {"Cookie": "Authorization=Bearer test-key"},
]


# Not in the list: "Bearer test-key " (trailing space). RFC 9110 section 5.5 excludes trailing
# whitespace from a field's value, and uvicorn >= 0.55 strips it (0.54 kept it), so that header
# carries the valid key.


@pytest.fixture
def restored(sparse_server):
    """Puts the start-up settings back after the test whatever it asserted, so that a route that
    wrongly accepts a change fails this test only, not every later test on the shared server."""
    yield sparse_server
    if settings(get_state(sparse_server)) != (START["p"], START["target"]):
        restore(sparse_server)


@pytest.mark.usefixtures("restored")
@pytest.mark.parametrize("headers", KEYLESS_HEADERS, ids=lambda h: repr(h) or "none")
def test_no_valid_key_no_change(sparse_server, headers):
    headers = {"Content-Type": "application/json", **headers}
    for method, body in (("POST", '{"p": 0.5}'), ("GET", "")):
        status, _ = raw_request(sparse_server, method, "/v1/sparsity", body, headers)
        assert status == 401, (method, headers)
    assert settings(get_state(sparse_server)) == (START["p"], START["target"])


PATH_VARIANTS = ["/v1/sparsity/", "//v1/sparsity", "/V1/sparsity", "/v1/Sparsity",
                 "/v1/./sparsity", "/v1/../v1/sparsity", "/x/../v1/sparsity", "/v1//sparsity",
                 "/v1/%73parsity", "/%76%31/sparsity", "/v1%2Fsparsity", "/v1/sparsity%2F",
                 "/v1/sparsity;x=1", "/v1/sparsity?p=0.5", "/v1/sparsity.json", "/./v1/sparsity",
                 "http://127.0.0.1/v1/sparsity", "/v1/sparsity%00", "/v1/sparsity#x"]


@pytest.mark.usefixtures("restored")
@pytest.mark.parametrize("path", PATH_VARIANTS)
def test_path_variants_without_the_key_are_refused_or_not_routed(sparse_server, path):
    """Refused (401) where vLLM's key check sees the /v1 prefix, else not routed (404/405): no
    variant reaches the route without the key."""
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        status, _ = raw_request(sparse_server, "POST", path, '{"p": 0.5}',
                                {"Content-Type": "application/json", **headers})
        assert status in (400, 401, 404, 405), (path, status)
    assert settings(get_state(sparse_server)) == (START["p"], START["target"])


def test_valid_change_then_restore(sparse_server):
    """The checks above would pass on a route that refuses everything: this one succeeds."""
    status, reply = raw_request(sparse_server, "POST", "/v1/sparsity",
                                '{"p": 0.75, "target": "intermediate"}',
                                {**sparse_server.headers,
                                 "Content-Type": "application/json; charset=utf-8"})
    try:
        assert status == 200 and settings(json.loads(reply)) == (0.75, "intermediate")
        assert settings(get_state(sparse_server)) == (0.75, "intermediate")
    finally:
        restore(sparse_server)
    unchanged_and_serving(sparse_server)


def test_concurrent_posts_each_answer_their_own_change(sparse_server):
    """Changes sent together are applied one after the other: each reply shows the values its
    own body asked for, and the server ends in one of them."""
    from concurrent.futures import ThreadPoolExecutor

    asked = [(0.55, "input"), (0.65, "intermediate"), (0.75, "all_inputs"), (0.85, "input")]
    try:
        with ThreadPoolExecutor(len(asked)) as pool:
            replies = list(pool.map(lambda b: post(sparse_server, {"p": b[0], "target": b[1]}),
                                    asked))
        assert [r.status_code for r in replies] == [200] * len(asked)
        assert [settings(r.json()) for r in replies] == asked
        assert settings(get_state(sparse_server)) in asked
    finally:
        restore(sparse_server)
    unchanged_and_serving(sparse_server)
