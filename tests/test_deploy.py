"""deploy/: promtool accepts the Prometheus configs and rules, the alerts fire when they should,
and the dashboard, compose file and Kubernetes manifests name metrics and files that exist."""

from __future__ import annotations

import json
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
    inputs = [
        series("vllm_sparsity_p_ratio", {**job, "site": "input"}, "0.9x40"),
        series("vllm_sparsity_p_ratio", {**job, "site": "intermediate"}, "0.9x40"),
        series("vllm_sparsity_activations_total", good, f"0+{tokens_per_min}x40"),
        series("vllm_sparsity_activations_zeroed_total", good, f"0+{tokens_per_min // 2}x40"),
        # 5% zeroed at p = 0.9: below 0.8 * (1 - 0.9) = 8%.
        series("vllm_sparsity_activations_total", bad, f"0+{tokens_per_min}x40"),
        series("vllm_sparsity_activations_zeroed_total", bad, f"0+{tokens_per_min // 20}x40"),
    ]
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
    for name in metrics.METRIC_NAMES:
        assert re.fullmatch(r"vllm_sparsity_[a-z_]+_(total|seconds|ratio|info)", name), name


def test_dashboard_uses_the_datasource_and_model_name_variables():
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["model_name"]["type"] == "query"
    titles = [p["title"] for p in board["panels"]]
    assert len(set(titles)) == len(titles)
    assert len({p["id"] for p in board["panels"]}) == len(titles)
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert 'model_name="$model_name"' in target["expr"], panel["title"]
    kinds = {p["type"] for p in board["panels"]}
    assert "heatmap" in kinds


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
