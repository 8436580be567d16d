"""End to end: `vllm serve` with the plugin, queried with the openai client, and its control route."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests

VLLM = Path(sys.executable).with_name("vllm")


def test_completions_and_chat_with_openai_client(sparse_server):
    client = openai.OpenAI(base_url=f"{sparse_server.url}/v1", api_key=sparse_server.api_key)
    completion = client.completions.create(model=sparse_server.model, prompt="The capital of France is",
                                           max_tokens=12, temperature=0)
    text = completion.choices[0].text
    assert completion.usage.completion_tokens == 12 and text.strip()
    chat = client.chat.completions.create(
        model=sparse_server.model, max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": "Name a large city in France."}])
    assert chat.choices[0].message.content.strip()
    assert chat.usage.prompt_tokens > 5  # the chat template wrapped the message


def test_server_reports_the_configured_sparsity(sparse_server):
    state = requests.get(f"{sparse_server.url}/v1/sparsity", headers=sparse_server.headers).json()
    assert (state["p"], state["target"], state["backend"]) == (0.9, "all_inputs", "auto")
    # Gemma 3 270M: 18 layers, both sites of each.
    assert {(r["layer"], r["site"]) for r in state["layers"]} == {
        (i, s) for i in range(18) for s in ("input", "intermediate")}
    assert state["mode"] == "exact"
    # Each layer's batch policy: the crossover this server fixes (conftest), not measured.
    want = ({"m_max": 8, "measured": False, "source": "VLLM_SPARSITY_CPU_M_MAX"}
            if state["resolved_backend"] == "cpu" else None)
    assert state["resolved_backend"] in ("cpu", "torch")
    assert all(r["crossover"] == want for r in state["layers"]), state["layers"][0]


def test_control_route_needs_the_api_key(sparse_server):
    r = requests.post(f"{sparse_server.url}/v1/sparsity", json={"p": 0.5})
    assert r.status_code == 401
    r = requests.get(f"{sparse_server.url}/v1/sparsity",
                     headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


@pytest.mark.parametrize("body, message", [
    ({"p": 0}, r"p must be a number in [1e-06, 1]"),
    ({"p": 1.5}, r"p must be a number in [1e-06, 1]"),
    ({"p": "0.5"}, r"p must be a number in [1e-06, 1]"),
    ({"target": "output"}, "target must be one of input, intermediate, all_inputs"),
    ({"top_p": 0.5}, "body must be a JSON object"),
])
def test_control_route_rejects_bad_values_and_keeps_serving(sparse_server, body, message):
    r = requests.post(f"{sparse_server.url}/v1/sparsity", json=body, headers=sparse_server.headers)
    assert r.status_code == 400 and message in r.json()["error"]
    state = requests.get(f"{sparse_server.url}/v1/sparsity", headers=sparse_server.headers).json()
    assert state["p"] == 0.9 and state["target"] == "all_inputs"
    assert sparse_server.completion("Hello", max_tokens=2)["choices"][0]["text"]


def test_control_route_changes_p_for_the_next_request(sparse_server):
    url, headers = f"{sparse_server.url}/v1/sparsity", sparse_server.headers

    def sparsity_of_one_request(**body):
        assert requests.post(url, json=body, headers=headers).status_code == 200
        before = requests.get(url, headers=headers).json()["layers"]
        sparse_server.completion("A short story about a robot:", max_tokens=4)
        after = requests.get(url, headers=headers).json()["layers"]
        zeroed = sum(a["zeroed"] - b["zeroed"] for a, b in zip(after, before))
        total = sum(a["total"] - b["total"] for a, b in zip(after, before))
        return zeroed / total

    try:
        low, high = sparsity_of_one_request(p=0.5), sparsity_of_one_request(p=0.95)
        assert 0.5 < low < 0.95 and 0.05 < high < low
        intermediate_only = sparsity_of_one_request(p=0.5, target="intermediate")
        assert intermediate_only < low  # the input site now keeps every nonzero
    finally:
        requests.post(url, json={"p": 0.9, "target": "all_inputs"}, headers=headers)


BAD_FLAGS = [
    ("--sparsity-p", "0", "--sparsity-p must be a number in [1e-06, 1], got '0'"),
    ("--sparsity-p", "1.5", "--sparsity-p must be a number in [1e-06, 1], got '1.5'"),
    ("--sparsity-p", "nan", "--sparsity-p must be a number in [1e-06, 1], got 'nan'"),
    ("--sparsity-p", "ninety", "--sparsity-p must be a number in [1e-06, 1], got 'ninety'"),
    ("--sparsity-target", "output",
     "--sparsity-target must be one of input, intermediate, all_inputs or a comma list of sites "
     "(input,gate,up,intermediate); got 'output'"),
]


@pytest.fixture(scope="module")
def bad_flag_runs(demo_model):
    """``vllm serve`` with each bad flag, all started at once: each run is mostly vLLM's import
    (tens of seconds of CPU), so running them side by side saves that much per case."""
    procs = {}
    for flag, value, _ in BAD_FLAGS:
        extra = [] if flag == "--sparsity-p" else ["--sparsity-p", "0.5"]
        procs[flag, value] = subprocess.Popen(
            [str(VLLM), "serve", str(demo_model), flag, value, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = {}
    for case, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        runs[case] = (proc.returncode, stderr)
    return runs


@pytest.mark.parametrize("flag, value, message", BAD_FLAGS)
def test_bad_flag_stops_the_server_with_one_clear_line(bad_flag_runs, flag, value, message):
    returncode, stderr = bad_flag_runs[flag, value]
    assert returncode == 2
    assert f"vllm serve: error: {message}" in stderr.splitlines()


def test_help_lists_the_flags():
    out = subprocess.run([str(VLLM), "serve", "--help=Sparsity"], capture_output=True, text=True,
                         timeout=120).stdout
    for flag in ("--sparsity-p", "--sparsity-target", "--sparsity-backend"):
        assert flag in out


# A prompt longer than a KV block (so that the prefix cache can hold it), and a chat message.
LONG_PROMPT = " ".join(  # varied, not repeated: a repeated sentence is copied whatever the p
    f"Chapter {i}: the {w} of the old harbour town, told by a sailor who saw it change."
    for i, w in enumerate(["founding", "first war", "great fire", "flood", "plague", "railway",
                           "famine", "factories", "strikes", "bridge", "second war", "harbour",
                           "tourists", "museum", "storm", "election", "festival", "market"])
) + " Then the sailor said that"
CHAT = [{"role": "user", "content": "Describe the sea in one sentence."}]


def test_p_per_request(sparse_server):
    """Requests carrying ``vllm_xargs.sparsity_p`` (0.5, 0.7) sent together with one without it
    each get exactly the greedy text of the whole server at that p (the references come from the
    same server with its global p switched by the route); the prefix cache is never shared across
    p; bad values get 400 naming the field and the server keeps serving."""
    import concurrent.futures

    url, headers = f"{sparse_server.url}/v1/sparsity", sparse_server.headers
    client = openai.OpenAI(base_url=f"{sparse_server.url}/v1", api_key=sparse_server.api_key)

    # Every text compared below is computed from a cold prefix cache (a salt of its own): a
    # prompt's tail recomputed after a prefix-cache hit runs other GEMM shapes than the whole
    # prompt, which on some CPUs rounds the activations otherwise and can flip a late greedy token.
    salts = itertools.count()

    def extra_body(p, cold):
        extra = {"vllm_xargs": {"sparsity_p": p}} if p is not None else {}
        return {**extra, "cache_salt": f"cold-{next(salts)}"} if cold else extra or None

    def complete(p=None, cold=True):
        c = client.completions.create(model=sparse_server.model, prompt=LONG_PROMPT,
                                      max_tokens=16, temperature=0, extra_body=extra_body(p, cold))
        return c.choices[0].text, c.usage.prompt_tokens_details.cached_tokens

    def chat(p=None):
        c = client.chat.completions.create(model=sparse_server.model, messages=CHAT,
                                           max_tokens=16, temperature=0,
                                           extra_body=extra_body(p, True))
        return c.choices[0].message.content

    def counts():
        """(the server's counters per site, the per-p counters) from the route."""
        state = requests.get(url, headers=headers).json()
        per_site = {}
        for row in state["layers"]:
            z, t = per_site.get(row["site"], (0, 0))
            per_site[row["site"]] = (z + row["zeroed"], t + row["total"])
        by_p = {p: {site: (c["zeroed"], c["total"]) for site, c in sites.items()}
                for p, sites in state["request_p"]["counters"].items()}
        return per_site, by_p, state["request_p"]["applied"]

    def minus(a, b):
        return {site: (a[site][0] - b.get(site, (0, 0))[0], a[site][1] - b.get(site, (0, 0))[1])
                for site in a}

    ref, ref_chat, ref_counts = {}, {}, {}
    try:
        for p in (0.5, 0.7):  # the route clears the prefix cache at each change
            assert requests.post(url, json={"p": p}, headers=headers).status_code == 200
            before = counts()[0]
            ref[p], ref_chat[p] = complete()[0], chat()
            ref_counts[p] = minus(counts()[0], before)
    finally:
        requests.post(url, json={"p": 0.9, "target": "all_inputs"}, headers=headers)
    ref[0.9] = complete()[0]
    assert len({ref[0.5], ref[0.7], ref[0.9]}) == 3  # p changes the text: the test can fail
    assert ref_chat[0.5] != ref_chat[0.7]

    _, by_p_before, applied = counts()
    assert applied
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        jobs = {p: pool.submit(complete, p) for p in (0.5, 0.7, None)}
        chats = {p: pool.submit(chat, p) for p in (0.5, 0.7)}
        got = {p: job.result()[0] for p, job in jobs.items()}
        got_chat = {p: job.result() for p, job in chats.items()}
    assert got == {0.5: ref[0.5], 0.7: ref[0.7], None: ref[0.9]}
    assert got_chat == ref_chat
    # The per-p counters: each p's requests alone, as the whole server counted them at that p.
    # Activations in all are exact; zeroed ones to 1e-4 of them: batched with other requests,
    # the model's GEMMs may round the activations' last bits otherwise, which moves a handful of
    # entries across a threshold. A request counted at the other p would be off by
    # tens of percent (the two p differ in sparsity by far more).
    by_p = counts()[1]
    for p in (0.5, 0.7):
        got_p = minus(by_p[repr(p)], by_p_before.get(repr(p), {}))
        assert got_p.keys() == ref_counts[p].keys(), p
        for site, (zeroed, total) in got_p.items():
            ref_zeroed, ref_total = ref_counts[p][site]
            assert total == ref_total, (p, site)
            assert abs(zeroed - ref_zeroed) <= 1e-4 * total, (p, site, zeroed, ref_zeroed)
    assert abs(sum(z for z, _ in ref_counts[0.5].values())
               - sum(z for z, _ in ref_counts[0.7].values())) > 1e-2 * sum(
        t for _, t in ref_counts[0.5].values())  # the bound above tells the two p apart

    # Prefix cache: a repeat at the same p reuses the prompt's blocks; another p never does.
    assert complete(0.5, cold=False)[1] == 0 and complete(0.5, cold=False)[1] > 0
    fresh = f"Another start. {LONG_PROMPT}"
    complete_fresh = lambda p: client.completions.create(  # noqa: E731
        model=sparse_server.model, prompt=fresh, max_tokens=1, temperature=0,
        extra_body={"vllm_xargs": {"sparsity_p": p}}).usage.prompt_tokens_details.cached_tokens
    assert complete_fresh(0.5) == 0 and complete_fresh(0.5) > 0
    assert complete_fresh(0.7) == 0

    for bad in (0, 1.5, "0.5", "abc", math.nan):
        body = {"model": sparse_server.model, "prompt": "Hello", "max_tokens": 2,
                "vllm_xargs": {"sparsity_p": bad}}
        # json.dumps writes NaN as the bare token NaN, which the server's parser accepts.
        r = requests.post(f"{sparse_server.url}/v1/completions", data=json.dumps(body),
                          headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 400, (bad, r.text)
        assert "vllm_xargs.sparsity_p" in r.text and "[1e-06, 1]" in r.text, r.text
    assert complete()[0] == ref[0.9]  # still serving, at the server's p
