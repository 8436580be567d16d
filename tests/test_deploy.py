"""deploy/: promtool accepts the Prometheus configs and rules, the alerts fire when they should,
the dashboard, compose file and Kubernetes manifests name metrics and files that exist, the
runtime route is enabled behind an API key, and the image's build context stays small."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vllm_sparsity import metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vllm-sparsity.json"
K8S = DEPLOY / "k8s"


def promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: `make setup` installs Debian's prometheus package"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def k8s_docs(name) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"]
    return [r["expr"] for g in rules for r in g["rules"]]


def test_promtool_accepts_the_compose_scrape_config_and_rules():
    r = promtool("check", "config", "prometheus.yml", cwd=DEPLOY)  # also checks rules.yml
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "rules", "rules.yml", cwd=DEPLOY)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_accepts_the_kubernetes_scrape_config_and_rules(tmp_path):
    (config,) = k8s_docs("prometheus-scrape-config.yaml")
    (tmp_path / "prometheus.yml").write_text(config["data"]["prometheus.yml"])
    r = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (rule,) = k8s_docs("prometheus-rule.yaml")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    r = promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_rules_equal_the_compose_rules():
    (rule,) = k8s_docs("prometheus-rule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load((DEPLOY / "rules.yml").read_text())


def series(name, labels, values):
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def test_alerts_fire_on_broken_sparsity_and_latency_and_not_otherwise(tmp_path):
    """promtool's rule unit tests on synthetic series: 1 minute steps, 40 minutes."""
    job = {"job": "vllm", "instance": "a:8000", "model_name": "m"}
    tokens_per_min = 6000  # activations per minute per site
    good = {**job, "layer": "0", "site": "input", "phase": "decode"}
    bad = {**job, "layer": "0", "site": "intermediate", "phase": "decode"}
    info = {"target": "all_inputs", "backend": "auto", "resolved_backend": "torch"}
    inputs = [
        series("vllm_sparsity_config_info", {**job, **info, "rule": "top-p"}, "1x40"),
        series("vllm_sparsity_p_ratio", {**job, "site": "input"}, "0.9x40"),
        series("vllm_sparsity_p_ratio", {**job, "site": "intermediate"}, "0.9x40"),
        series("vllm_sparsity_activations_total", good, f"0+{tokens_per_min}x40"),
        series("vllm_sparsity_activations_zeroed_total", good, f"0+{tokens_per_min // 2}x40"),
        # 5% zeroed at p = 0.9: below 0.8 * (1 - 0.9) = 8%.
        series("vllm_sparsity_activations_total", bad, f"0+{tokens_per_min}x40"),
        series("vllm_sparsity_activations_zeroed_total", bad, f"0+{tokens_per_min // 20}x40"),
    ]
    # A max-p server (p: a fraction of the row's max, no promised sparsity), its intermediate site
    # outside the target (p = 0, max-p's keep-everything p): 5% and 0% zeroed, no alert.
    max_p = {**job, "instance": "b:8000"}
    inputs += [
        series("vllm_sparsity_config_info", {**max_p, **info, "rule": "max-p"}, "1x40"),
        series("vllm_sparsity_p_ratio", {**max_p, "site": "input"}, "0.5x40"),
        series("vllm_sparsity_p_ratio", {**max_p, "site": "intermediate"}, "0x40"),
    ]
    for site, zeroed in (("input", tokens_per_min // 20), ("intermediate", 0)):
        labels = {**max_p, "layer": "0", "site": site, "phase": "decode"}
        inputs += [series("vllm_sparsity_activations_total", labels, f"0+{tokens_per_min}x40"),
                   series("vllm_sparsity_activations_zeroed_total", labels, f"0+{zeroed}x40")]
    # MLP latency: 1 ms for 20 minutes, then 10 ms (p99 far above its average).
    for le, fast, slow in (("0.001", 100, 0), ("0.01", 100, 100), ("+Inf", 100, 100)):
        inputs.append(series("vllm_sparsity_mlp_latency_seconds_bucket",
                             {**job, "phase": "decode", "le": le},
                             f"0+{fast}x20 {20 * fast}+{slow}x20"))
    alert = {**job, "site": "intermediate"}
    descriptions = {r["alert"]: r["annotations"]["description"]
                    for g in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"]
                    for r in g["rules"] if "alert" in r}
    tests = {"rule_files": [str(DEPLOY / "rules.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "VllmSparsityBelowPromise", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "VllmSparsityBelowPromise",
             "exp_alerts": [{"exp_labels": {**alert, "severity": "warning"}, "exp_annotations": {
                 "summary": "m on a:8000: intermediate sparsity 5% is far below 1 - p",
                 "description": descriptions["VllmSparsityBelowPromise"]}}]},
            {"eval_time": "18m", "alertname": "VllmSparsityMlpLatencyRegression",
             "exp_alerts": []},
            {"eval_time": "39m", "alertname": "VllmSparsityMlpLatencyRegression",
             "exp_alerts": [{"exp_labels": {**job, "phase": "decode", "severity": "warning"},
                             "exp_annotations": {
                 "summary": "m on a:8000: MLP p99 (decode) is 9.91ms, 1.5x its 1-day average",
                 "description": descriptions["VllmSparsityMlpLatencyRegression"]}}]},
        ],
    }]}
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests))
    r = promtool("test", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def alerts_at(eval_time, alertname, exp_alerts):
    return {"eval_time": eval_time, "alertname": alertname, "exp_alerts": exp_alerts}


def fired(labels, summary, alertname, severity="warning"):
    return {"exp_labels": {**labels, "severity": severity},
            "exp_annotations": {"summary": summary, "description": descriptions()[alertname]}}


def descriptions() -> dict:
    return {r["alert"]: r["annotations"]["description"]
            for g in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"]
            for r in g["rules"] if "alert" in r}


def promtool_rule_test(tmp_path, inputs, alert_tests):
    tests = {"rule_files": [str(DEPLOY / "rules.yml")], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": inputs, "alert_rule_test": alert_tests}]}
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests))
    r = promtool("test", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_latency_alert_fires_on_inter_token_latency(tmp_path):
    """vLLM's inter-token latency (published on CUDA too): 20 ms for 20 minutes, then 200 ms."""
    job = {"job": "vllm", "instance": "a:8000", "model_name": "m"}
    inputs = [series("vllm:inter_token_latency_seconds_bucket", {**job, "engine": "0", "le": le},
                     f"0+{fast}x20 {20 * fast}+{slow}x20")
              for le, fast, slow in (("0.025", 100, 0), ("0.25", 100, 100), ("+Inf", 100, 100))]
    # histogram_quantile: linear inside the bucket (0.025, 0.25] that holds every token.
    p99 = 0.025 + (0.25 - 0.025) * 0.99
    promtool_rule_test(tmp_path, inputs, [
        alerts_at("18m", "VllmSparsityInterTokenLatencyRegression", []),
        alerts_at("39m", "VllmSparsityInterTokenLatencyRegression", [fired(
            job, f"m on a:8000: inter-token latency p99 is {p99 * 1e3:.4g}ms, 1.5x its 1-day "
            "average", "VllmSparsityInterTokenLatencyRegression")])])


def test_stale_absent_and_disagreement_alerts_fire_for_the_bad_replica_only(tmp_path):
    """Three replicas of one model, 40 one-minute steps. a: healthy. b: its plugin polled the
    workers for 20 minutes, then stopped (engine dead, or polls failing), and from minute 10 one
    worker disagrees, and from minute 26 its workers count tokens of unknown phase. c: vLLM without
    any plugin series."""
    job = {"job": "vllm", "model_name": "m"}
    a, b, c = ({**job, "instance": f"{x}:8000"} for x in "abc")
    inputs = [series("vllm:num_requests_running", {**r, "engine": "0"}, "1x40") for r in (a, b, c)]
    inputs += [
        # Unix time of the last poll: promtool's clock starts at 0, one step is 60 s.
        series("vllm_sparsity_last_poll_timestamp_seconds", a, "0+60x40"),
        series("vllm_sparsity_last_poll_timestamp_seconds", b, "0+60x20 1200x20"),
        series("vllm_sparsity_disagreeing_workers", a, "0x40"),
        series("vllm_sparsity_disagreeing_workers", b, "0x10 1x30"),
        series("vllm_sparsity_unknown_phase_tokens_total", a, "0x40"),
        series("vllm_sparsity_unknown_phase_tokens_total", b, "0x25 0+3x15"),
    ]
    promtool_rule_test(tmp_path, inputs, [
        alerts_at("20m", "VllmSparsityMetricsStale", []),
        alerts_at("30m", "VllmSparsityMetricsStale", [fired(
            b, "m on b:8000: sparsity metrics are 10m 0s old", "VllmSparsityMetricsStale")]),
        alerts_at("5m", "VllmSparsitySeriesAbsent", []),
        alerts_at("15m", "VllmSparsitySeriesAbsent", [fired(
            c, "m on c:8000: vLLM is up but no vllm_sparsity_* series",
            "VllmSparsitySeriesAbsent")]),
        alerts_at("10m", "VllmSparsityWorkersDisagree", []),
        alerts_at("15m", "VllmSparsityWorkersDisagree", [fired(
            b, "m on b:8000: 1 worker(s) run other sparsity settings",
            "VllmSparsityWorkersDisagree", severity="critical")]),
        alerts_at("25m", "VllmSparsityUnknownPhaseTokens", []),
        alerts_at("27m", "VllmSparsityUnknownPhaseTokens", [fired(
            b, "m on b:8000: token phases unknown, counted as prefill",
            "VllmSparsityUnknownPhaseTokens")]),
    ])


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (vLLM's have a colon; recording rules start with
    vllm_sparsity: and are not exported names)."""
    names = set(re.findall(r"\b(vllm:[a-z_:]+|vllm_sparsity_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def exported_names() -> set[str]:
    return {n.removesuffix("_total") for n in metrics.METRIC_NAMES}


def vllm_metric_names() -> set[str]:
    """The vllm:* names registered by the installed vLLM's Prometheus logger."""
    import vllm.v1.metrics.loggers as loggers

    return set(re.findall(r'name="(vllm:[a-z_]+)"', Path(loggers.__file__).read_text()))


def test_every_dashboard_and_rule_metric_exists():
    vllm_names = vllm_metric_names()
    assert "vllm:inter_token_latency_seconds" in vllm_names
    used = set().union(*map(metric_names, dashboard_exprs() + rule_exprs()))
    for name in used:
        if name.startswith("vllm:"):
            # prometheus-client appends _total to counters: vllm:generation_tokens_total.
            assert name.removesuffix("_total") in vllm_names, name
        else:
            assert name.removesuffix("_total") in exported_names(), name
    # And every exported series is shown or used somewhere.
    assert {n.removesuffix("_total") for n in used if n.startswith("vllm_sparsity_")} \
        == exported_names()


def test_metric_names_follow_the_style():
    # Units as suffixes; a count of workers is in workers (Prometheus: unit, plural).
    for name in metrics.METRIC_NAMES:
        assert re.fullmatch(r"vllm_sparsity_[a-z_]+_(total|seconds|ratio|info|workers)", name), name


def test_dashboard_uses_the_datasource_model_name_and_instance_variables():
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    # Both from a vLLM series: they list a server whose plugin series vanished, too.
    assert variables["model_name"]["type"] == "query"
    assert variables["model_name"]["query"]["query"] == \
        "label_values(vllm:num_requests_running, model_name)"
    instance = variables["instance"]
    assert instance["query"]["query"] == \
        'label_values(vllm:num_requests_running{model_name="$model_name"}, instance)'
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".*"
    titles = [p["title"] for p in board["panels"]]
    assert len(set(titles)) == len(titles)
    assert len({p["id"] for p in board["panels"]}) == len(titles)
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert 'model_name="$model_name", instance=~"$instance"' in target["expr"], \
                panel["title"]
    kinds = {p["type"] for p in board["panels"]}
    assert "heatmap" in kinds


AGGREGATION = re.compile(r"\b(sum|avg|min|max|count|group|topk|bottomk|quantile)\s*(by|without)?"
                         r"\s*(\(([^()]*)\))?\s*\(")


def test_every_dashboard_panel_keeps_instances_apart():
    """Each panel shows one replica per series: every aggregation keeps ``instance`` (``by``),
    and a series' legend names its instance; or the panel is repeated per selected instance (the
    heatmaps, which cannot tell series apart), its title naming it."""
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        repeated = panel.get("repeat") == "instance"
        assert repeated or panel["type"] != "heatmap", panel["title"]
        if repeated:
            assert "$instance" in panel["title"], panel["title"]
        for target in panel["targets"]:
            for m in AGGREGATION.finditer(target["expr"]):
                how, labels = m.group(2), m.group(4) or ""
                assert how == "by" and "instance" in labels.replace(" ", "").split(","), \
                    (panel["title"], m.group(0))
            assert repeated or "{{instance}}" in target["legendFormat"], panel["title"]
    assert AGGREGATION.search("sum(rate(x[5m]))") and AGGREGATION.search("sum by (le) (x)")
    # The rule is on the dashboard (the label of vllm_sparsity_config_info).
    info = [t for p in board["panels"] for t in p["targets"]
            if "vllm_sparsity_config_info" in t["expr"]]
    assert info and all("{{rule}}" in t["legendFormat"] for t in info)


def test_below_promise_alert_applies_to_rules_that_promise_sparsity():
    """Its condition: sparsity < 0.8 (1 - p), on top-p, top-k and lq servers only (each keeps at
    most about pK of K inputs); max-p's p promises no sparsity."""
    (alert,) = [r for g in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"]
                for r in g["rules"] if r.get("alert") == "VllmSparsityBelowPromise"]
    expr = " ".join(alert["expr"].split())
    assert expr.startswith("vllm_sparsity:sparsity:ratio_rate5m < on (job, instance, model_name, "
                           "site) 0.8 * (1 - vllm_sparsity_p_ratio)")
    assert 'vllm_sparsity_config_info{rule=~"top-p|top-k|lq"}' in expr
    from vllm_sparsity import rule

    assert set(rule.RULES) == {"top-p", "top-k", "lq", "max-p"}  # a new rule needs a decision here


def test_compose_mounts_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vllm", "prometheus", "grafana"}
    assert any(a.startswith("--sparsity-p") for a in services["vllm"]["command"])
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), (service, source)
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["vllm:8000"]
    assert scrape["metrics_path"] == "/metrics"


def test_runtime_route_is_enabled_behind_a_secret_api_key():
    """The runbook's GET /v1/sparsity needs the route (VLLM_PLUGINS) and, to stay safe, a key."""
    (deployment,) = k8s_docs("deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "sparsity" in env["VLLM_PLUGINS"]["value"].split(",")
    key = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key["name"] and key["key"] and not key.get("optional", False)
    assert not any(a.startswith("--api-key") for a in container["args"])  # not in the cmdline
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["vllm"]
    assert "sparsity" in compose["environment"]["VLLM_PLUGINS"].split(",")
    assert compose["environment"]["VLLM_API_KEY"].startswith("${VLLM_API_KEY:?")  # required
    readme = (REPO / "README.md").read_text()
    assert re.search(r'curl [^\n]*/v1/sparsity -H "Authorization: Bearer \$VLLM_API_KEY"',
                     readme), "the runbook shows the key header"


CONTEXT_LIMIT_BYTES = 5 * 2**20


def test_docker_build_context_stays_small():
    """The files docker sends for compose.yaml's build (context: the repository root), selected
    as docker does from .dockerignore (docker-py's exclude_paths implements its rules)."""
    from docker.utils.build import exclude_paths

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    root = (DEPLOY / compose["services"]["vllm"]["build"]["context"]).resolve()
    assert root == REPO
    lines = (root / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sent = exclude_paths(str(root), patterns)
    files = [f for f in sent if os.path.isfile(root / f) and not os.path.islink(root / f)]
    size = sum(os.path.getsize(root / f) for f in files)
    assert size < CONTEXT_LIMIT_BYTES, (size, sorted(files, key=lambda f: -os.path.getsize(
        root / f))[:10])
    assert not {f.split("/")[0] for f in sent} & {".git", ".venv", "tests", "deploy"}
    assert not [f for f in sent if "__pycache__" in f or f.endswith(".pyc")]
    # What `pip install` of the package reads is all there.
    assert {"pyproject.toml", "README.md", "vllm_sparsity/plugin.py",
            "kernels/cpu/input_sparse_gemv.cpp", "kernels/cpu/top_p_select.h",
            "eval/__init__.py"} <= set(sent)


def test_kubernetes_deployment_service_and_monitor_agree():
    (deployment,) = k8s_docs("deployment.yaml")
    service, headless = k8s_docs("service.yaml")
    (monitor,) = k8s_docs("servicemonitor.yaml")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert any(a.startswith("--sparsity-p=") for a in container["args"])
    port = container["ports"][0]
    assert f"--port={port['containerPort']}" in container["args"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels.items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == labels
    (config,) = k8s_docs("prometheus-scrape-config.yaml")
    (dns,) = yaml.safe_load(config["data"]["prometheus.yml"])["scrape_configs"][0]["dns_sd_configs"]
    assert dns["names"][0].startswith(headless["metadata"]["name"] + ".")
    assert dns["port"] == port["containerPort"]


def test_deployment_keeps_its_caches_on_a_volume_and_waits_for_a_27b_start():
    """vLLM's compile cache, Triton's and the plugin's caches and the checkpoint live on the
    claimed volume (a new pod neither downloads nor compiles again); the startup probe allows an
    hour (a 27B download and compile on an empty cache)."""
    (deployment,) = k8s_docs("deployment.yaml")
    (claim,) = k8s_docs("cache-pvc.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    cache = volumes[mounts["/cache"]]
    assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    for name in ("VLLM_CACHE_ROOT", "VLLM_SPARSITY_CACHE", "TRITON_CACHE_DIR", "HF_HOME"):
        assert env[name].startswith("/cache/"), name
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 3600
    assert claim["kind"] == "PersistentVolumeClaim"
