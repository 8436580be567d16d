"""End to end: `vllm serve` with the plugin, queried with the openai client, and its control route."""

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
