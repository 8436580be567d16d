"""Workers that answer the plugin later than it waits never take the engine down.

Against the session's ``sparse_server``: a real ``vllm serve`` under vLLM's default multiprocess
executor (the only executor whose reply queue a late reply can desynchronise). Its workers read a
test-only switch (``worker_rpc.TEST_DELAY_ENV``, the server's ``rpc_delay_file``) that makes a
named method sleep past the API server's wait (``engine_rpc.WAIT_S``, ``metrics.POLL_WAIT_S``),
as a long prefill, a compile or a starved core would. Marked ``kills_server``: were the bug back,
the engine would die, so this runs after the tests that need it alive.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from route_client import get_state, post, restore, route, run_load
from test_load import counter_growth, layer_widths

from vllm_sparsity import engine_rpc, metrics

LATE_S = max(engine_rpc.WAIT_S, metrics.POLL_WAIT_S) + 3  # past every wait of the API server
FATAL = ("EngineCore encountered a fatal error", "EngineDeadError",
         "has no attribute 'sampled_token_ids'")


def wait_for(what, done, timeout_s: float = 120.0, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def answered(server) -> bool:
    """GET /v1/sparsity answers 200 (no late call of the route is left in the engine)."""
    return requests.get(route(server), headers=server.headers, timeout=60).status_code == 200


@pytest.mark.kills_server
def test_late_workers_never_kill_the_engine_and_the_counters_stay_exact(sparse_server,
                                                                         demo_model):
    server, delay = sparse_server, sparse_server.rpc_delay_file
    log_start = server.log.stat().st_size
    new_log = lambda: server.log.read_bytes()[log_start:].decode(errors="replace")  # noqa: E731
    widths = layer_widths(demo_model)
    before = get_state(server)
    stop = threading.Event()
    result = {}
    load = threading.Thread(target=lambda: result.update(
        load=run_load(server, 0, streams=2, max_tokens=16, until=stop)), daemon=True)
    load.start()
    try:
        # 1. The metrics poll and GET /v1/sparsity find the workers late.
        delay.write_text(json.dumps({"vllm_sparsity_snapshot": LATE_S}))
        wait_for("a late metrics poll", lambda: "poll failed (WorkersLate" in new_log(), 60)
        late = requests.get(route(server), headers=server.headers, timeout=60)
        assert late.status_code == 503, late.text
        assert "the engine goes on serving" in late.json()["error"]
        time.sleep(LATE_S)  # the late replies come back while completions keep running
        delay.write_text("{}")
        wait_for("the route to answer again", lambda: answered(server))

        # 2. A change of p whose workers confirm late: 503, and the change still applies.
        delay.write_text(json.dumps({"vllm_sparsity_set": LATE_S}))
        reply = post(server, {"p": 0.8})
        assert reply.status_code == 503, reply.text
        assert "the change is still being applied" in reply.json()["error"]
        delay.write_text("{}")
        wait_for("the route to answer again", lambda: answered(server))
        assert get_state(server)["p"] == 0.8

        # 3. The analysis routes (this server is compiled: arming answers 409 once on time).
        delay.write_text(json.dumps({"vllm_sparsity_analysis_arm": LATE_S,
                                     "vllm_sparsity_analysis_fetch": LATE_S}))
        arm = requests.post(f"{route(server)}/analysis", json={"tokens": 4},
                            headers=server.headers, timeout=60)
        assert arm.status_code == 503, arm.text
        fetch = requests.get(f"{route(server)}/analysis", headers=server.headers, timeout=60)
        assert fetch.status_code == 503, fetch.text
        delay.write_text("{}")
        wait_for("the route to answer again", lambda: answered(server))
        time.sleep(2)  # a few more completions after the late replies
    finally:
        delay.write_text("{}")
        stop.set()
        load.join(timeout=300)
    restore(server)
    after = get_state(server)
    load_result = result["load"]
    print("\n" + load_result.report("load with late workers"))
    assert load_result.errors == []
    assert len(load_result.latencies) >= 4
    growth = counter_growth(before, after)
    assert growth == {key: load_result.forward_tokens * widths[key[1]] for key in growth}
    log = new_log()
    assert not [marker for marker in FATAL if marker in log], log[-4000:]
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
