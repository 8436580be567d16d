"""Soak of the engine-safety guarantees (a long run, outside ``make test``'s time).

Serves the random Llama-3.2-1B-shaped checkpoint (``vllm-sparsity random-model llama-3.2-1b``) in
bf16 with ``vllm serve`` (vLLM's default multiprocess executor) at p = 0.7, metrics polled every
0.5 s, and for ``--minutes`` runs ``--streams`` streams of short greedy completions, scrapes
``/metrics`` every 0.5 s, changes p every ``--flip-every`` seconds (0.5, 0.9, 0.7, ...), and
sends one more stream of alternating 4- and 64-token completions with the stream idle 2 s
between them.
Passes when every completion, scrape and change answered 200, every layer's counter grew by
exactly (tokens through the model) x (the site's width), and the server log holds no engine error.

    .venv/bin/python tests/soak_engine_safety.py --minutes 5 --streams 16

Prints one JSON summary line; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import VLLM, Server, free_port  # noqa: E402
from route_client import cached_tokens, complete, get_state, post, run_load  # noqa: E402
from test_engine_safety import FATAL  # noqa: E402
from test_load import counter_growth  # noqa: E402

from vllm_sparsity.tools.random_model import random_model_path  # noqa: E402

FLIPS = (0.5, 0.9, 0.7)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--flip-every", type=float, default=20.0, help="seconds between p changes")
    args = ap.parse_args(argv)

    model = random_model_path("llama-3.2-1b")
    config = json.loads((model / "config.json").read_text())
    widths = {"input": config["hidden_size"], "intermediate": config["intermediate_size"]}
    work = Path(tempfile.mkdtemp(prefix="vllm-sparsity-soak-"))
    port, log = free_port(), work / "server.log"
    cmd = [str(VLLM), "serve", str(model), "--served-model-name", "soak", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "1024", "--dtype", "bfloat16",
           "--max-num-seqs", str(args.streams), "--sparsity-p", "0.7",
           "--enable-prompt-tokens-details"]  # cached tokens per reply: exact counts
    env = {**os.environ, "VLLM_PLUGINS": "sparsity", "VLLM_SPARSITY_METRICS_INTERVAL_S": "0.5",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=work)
    server = Server("soak", proc, port, log, None, model="soak")
    failures: list[str] = []
    try:
        server.wait_ready()
        before = get_state(server)
        stop = threading.Event()
        out: dict = {}
        load = threading.Thread(target=lambda: out.update(load=run_load(
            server, 0, streams=args.streams, max_tokens=16, until=stop)), daemon=True)
        scrapes = {"ok": 0, "bad": []}

        def scrape() -> None:
            while not stop.is_set():
                r = requests.get(f"{server.url}/metrics", timeout=30)
                if r.status_code == 200 and "vllm_sparsity_activations_total" in r.text:
                    scrapes["ok"] += 1
                else:
                    scrapes["bad"].append(r.status_code)
                time.sleep(0.5)

        alternating = {"ok": 0, "bad": [], "forward_tokens": 0}

        def alternate() -> None:
            n = 0
            while not stop.is_set():
                try:
                    reply = complete(server, f"<{n}> Alternating request number {n}:",
                                     (4, 64)[n % 2], ignore_eos=True)
                    usage = reply["usage"]
                    alternating["ok"] += 1
                    alternating["forward_tokens"] += (usage["prompt_tokens"] - cached_tokens(
                        reply) + usage["completion_tokens"] - 1)
                except requests.RequestException as e:
                    alternating["bad"].append(str(e)[:200])
                n += 1
                time.sleep(2)

        scraper = threading.Thread(target=scrape, daemon=True)
        alternator = threading.Thread(target=alternate, daemon=True)
        load.start()
        scraper.start()
        alternator.start()
        flips, flip_errors = 0, []
        end = time.monotonic() + 60 * args.minutes
        while time.monotonic() < end:
            time.sleep(min(args.flip_every, max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            p = FLIPS[flips % len(FLIPS)]
            r = post(server, {"p": p})
            flips += 1
            if r.status_code != 200 or r.json()["p"] != p:
                flip_errors.append((r.status_code, r.text[:200]))
        stop.set()
        load.join(timeout=600)
        scraper.join(timeout=60)
        alternator.join(timeout=300)
        after = get_state(server)
        result = out["load"]
        tokens = result.forward_tokens + alternating["forward_tokens"]
        growth = counter_growth(before, after)
        exact = growth == {key: tokens * widths[key[1]] for key in growth}
        fatal = [m for m in FATAL if m in log.read_text(errors="replace")]
        summary = {"minutes": args.minutes, "streams": args.streams,
                   "requests": len(result.latencies) + alternating["ok"],
                   "request_errors": len(result.errors) + len(alternating["bad"]),
                   "completion_tokens": result.completion_tokens,
                   "forward_tokens": result.forward_tokens, "scrapes": scrapes["ok"],
                   "scrape_errors": len(scrapes["bad"]), "p_changes": flips,
                   "p_change_errors": len(flip_errors), "counters_exact": exact,
                   "engine_errors": fatal, "log": str(log)}
        print(json.dumps(summary))
        errors = result.errors + alternating["bad"]
        failures += [f"request errors: {errors[:3]}"] if errors else []
        failures += [f"scrape errors: {scrapes['bad'][:3]}"] if scrapes["bad"] else []
        failures += [f"p change errors: {flip_errors[:3]}"] if flip_errors else []
        failures += [] if exact else ["counters differ from the tokens served"]
        failures += [f"engine errors in the log: {fatal}"] if fatal else []
    finally:
        server.stop()
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
