#!/usr/bin/env python3
"""The checks behind scripts/validate-deploy.sh (which installs the tools and runs this
with their virtualenv's Python, the tools on PATH).

Every check is offline. Each one runs the real validator where one exists (the compose
spec's JSON schema, helm lint, the Kubernetes schemas, promtool, hadolint, yamllint) and
then checks what no validator knows: that the files agree with each other and with the
code (ports, service names, datasource uids, the metric catalog deploy/metrics.yaml, the
binaries scripts/build-binaries.sh builds). `selftest` feeds each of those consistency
checks a broken input and fails unless they catch it.

    validate_deploy.py [CHECK...]   compose helm prometheus grafana otel dockerfile yaml
                                    selftest (default: all)
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "taskpod"
KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.33.0")

# Prometheus v3 keys promtool 2.42 (the newest installable here) does not know. They are
# removed from a copy before `promtool check config`; check_prometheus_semantics checks
# them instead.
PROMETHEUS_V3_ONLY_GLOBAL_KEYS = ("scrape_protocols",)


class Failed(Exception):
    """A check found problems."""


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(text: str):
    return [d for d in yaml.safe_load_all(text) if d]


def run(cmd, *, stdin=None, cwd=ROOT, what=None) -> str:
    """Runs a validator; its failure is the check's failure."""
    proc = subprocess.run(cmd, input=stdin, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failed(f"{what or ' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n"
                     f"{proc.stdout}{proc.stderr}")
    return proc.stdout


def must_fail(cmd, what, *, stdin=None, expect=None, cwd=ROOT) -> None:
    """A negative case: the validator must refuse, and say `expect` if given."""
    proc = subprocess.run(cmd, input=stdin, cwd=cwd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        raise Failed(f"negative case accepted: {what}\n{out}")
    if expect and not re.search(expect, out):
        raise Failed(f"negative case failed for another reason than /{expect}/: {what}\n{out}")
    print(f"  refused as it should: {what}")


def expect_no_problems(what: str, problems: list[str]) -> None:
    if problems:
        raise Failed(f"{what}:\n  - " + "\n  - ".join(problems))


# --- the metric catalog and PromQL ---------------------------------------------------

CATALOG = load_yaml(DEPLOY / "metrics.yaml")
METRICS: dict = CATALOG["metrics"]
COMMON_LABELS = set(CATALOG["common_labels"])
SCRAPE_SERIES = set(CATALOG["scrape_series"])

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                "bool", "and", "or", "unless", "inf", "nan", "atan2", "start", "end"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")


def series_labels(name: str) -> set[str] | None:
    """The labels a series name may carry, or None when it is not in the catalog."""
    if name in SCRAPE_SERIES:
        return set(COMMON_LABELS)
    if name in METRICS:
        return set(METRICS[name]["labels"]) | COMMON_LABELS
    for suffix in ("_bucket", "_count", "_sum"):
        base = name.removesuffix(suffix)
        if base != name and METRICS.get(base, {}).get("type") == "histogram":
            extra = {"le"} if suffix == "_bucket" else set()
            return set(METRICS[base]["labels"]) | COMMON_LABELS | extra
    return None


def promql_problems(expr: str) -> list[str]:
    """Metric names and labels in a PromQL expression that the catalog does not have."""
    problems = []
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    grouped = set()
    for _, labels in GROUPING.findall(text):
        grouped |= {l.strip() for l in labels.split(",") if l.strip()}
    text = GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    seen: set[str] = set()
    allowed_for_grouping = set(COMMON_LABELS)
    pos = 0
    while True:
        m = IDENT.search(text, pos)
        if not m:
            break
        name = m.group(1)
        pos = m.end()
        rest = text[pos:].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation
        if name in PROMQL_WORDS:
            continue
        matchers = ""
        if rest.startswith("{"):
            close = rest.find("}")
            matchers = rest[1:close]
            pos = text.index("{", pos) + close + 1
        labels = series_labels(name)
        if labels is None:
            problems.append(f"{name} is not in deploy/metrics.yaml")
            continue
        seen.add(name)
        allowed_for_grouping |= labels
        for label, _ in MATCHER.findall(matchers):
            if label not in labels:
                problems.append(f"{name} has no label {label}")
    if re.search(r"(?<![\w}])\{", text):
        problems.append("a selector without a metric name")
    if not seen:
        problems.append(f"no catalog metric in {expr!r}")
    for label in sorted(grouped - allowed_for_grouping):
        problems.append(f"grouping by {label}, which none of {sorted(seen)} has")
    return problems


def grafana_to_promql(expr: str) -> str:
    """Replaces Grafana's variables so promtool can parse the expression."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{?\w+(:\w+)?\}?", "x", expr)
    return expr


def promtool_parses(exprs: list[str]) -> None:
    """Parses expressions with promtool by checking them as recording rules."""
    rules = {"groups": [{"name": "check", "rules": [
        {"record": f"check:expr:{i}", "expr": grafana_to_promql(e)} for i, e in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        run(["promtool", "check", "rules", f.name], what="promtool parsing the dashboards' PromQL")
    finally:
        os.unlink(f.name)


# --- compose -------------------------------------------------------------------------

def settings_keys(crate: str) -> set[str]:
    """TOP_LEVEL_KEYS of a binary's settings module (`settings.rs` or
    `settings/mod.rs`): the TASKPOD_* variables it reads."""
    src = ROOT / "crates" / crate / "src"
    path = next((p for p in (src / "settings.rs", src / "settings" / "mod.rs") if p.exists()), None)
    if path is None:
        raise Failed(f"no settings module in crates/{crate}/src")
    text = path.read_text()
    block = re.search(r"const TOP_LEVEL_KEYS: &\[&str\] = &\[(.*?)\];", text, re.S)
    if not block:
        raise Failed(f"no TOP_LEVEL_KEYS in {path.relative_to(ROOT)}")
    return set(re.findall(r'"([a-z_]+)"', block.group(1)))


def process_variables() -> set[str]:
    """TASKPOD_* variables read outside the settings tree (TASKPOD_CONFIG names the
    file, TASKPOD_LOG_FORMAT picks the log format): whichever the sources name."""
    sources = "".join(p.read_text() for p in (ROOT / "crates").rglob("*.rs"))
    return {v for v in ("TASKPOD_CONFIG", "TASKPOD_LOG_FORMAT") if f'"{v}"' in sources}


PROCESS_VARIABLES = process_variables()


def duration_secs(text: str) -> float:
    total, unit = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text)):
        total += float(n) * unit[u]
    return total


def port_of(addr: str) -> int:
    return int(str(addr).rsplit(":", 1)[1])


def taskpod_role(service: dict) -> str | None:
    command = service.get("command") or []
    first = command[0] if command else ""
    return {"taskpod-api": "api", "taskpod-worker": "worker", "taskpod": "cli"}.get(first)


def compose_problems(compose: dict, prometheus: dict, collector: dict) -> list[str]:
    problems = []
    services = compose.get("services", {})
    for name in ("postgres", "redis", "migrate", "api-1", "api-2", "worker-1", "worker-2",
                 "otel-collector", "tempo", "prometheus", "grafana"):
        if name not in services:
            problems.append(f"service {name} is missing")
    keys = {"api": settings_keys("api"), "worker": settings_keys("worker")}
    apis, workers, page_keys, names = [], [], set(), set()
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            target = services.get(dep)
            condition = cond.get("condition") if isinstance(cond, dict) else None
            if target is None:
                problems.append(f"{name} depends on unknown service {dep}")
            elif condition == "service_healthy" and "healthcheck" not in target:
                problems.append(f"{name} waits for {dep} to be healthy, which has no healthcheck")
            elif condition == "service_completed_successfully" and target.get("restart") != "no":
                problems.append(f"{name} waits for {dep} to complete, which restarts")
        for vol in svc.get("volumes") or []:
            source = str(vol).split(":", 1)[0]
            if source.startswith("./") and not (ROOT / source).exists():
                problems.append(f"{name} mounts {source}, which does not exist")
        role = taskpod_role(svc)
        if role is None:
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        if role in ("api", "worker"):
            (apis if role == "api" else workers).append(name)
            for key in env:
                if key.startswith("TASKPOD_") and key not in PROCESS_VARIABLES:
                    first = key.removeprefix("TASKPOD_").split("__")[0].lower()
                    if first not in keys[role]:
                        problems.append(f"{name}: {key} is not a taskpod-{role} setting")
            if env.get("OTEL_METRICS_EXPORTER") != "none":
                problems.append(f"{name}: OTEL_METRICS_EXPORTER must be none (metrics are scraped)")
            endpoint = urllib.parse.urlparse(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
            grpc_port = port_of(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
            if endpoint.hostname not in services or endpoint.port != grpc_port:
                problems.append(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT is not the collector's OTLP gRPC port")
            if env.get("OTEL_SERVICE_NAME") != f"taskpod-{role}":
                problems.append(f"{name}: OTEL_SERVICE_NAME must be taskpod-{role}")
            if "service.instance.id=" + name not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
                problems.append(f"{name}: OTEL_RESOURCE_ATTRIBUTES must name service.instance.id={name}")
            if "service.namespace=" in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
                problems.append(f"{name}: service.namespace would turn the OTLP job label into <namespace>/taskpod-{role}")
            port_key = "TASKPOD_LISTEN" if role == "api" else "TASKPOD_HEALTH_LISTEN"
            test = (svc.get("healthcheck") or {}).get("test") or []
            want = ["CMD", "taskpod", "health", "--address"]
            if test[:4] != want or len(test) < 5:
                problems.append(f"{name}: healthcheck must run `taskpod health --address ...`")
            elif port_key not in env or urllib.parse.urlparse(test[4]).port != port_of(env[port_key]):
                problems.append(f"{name}: healthcheck does not probe {port_key}")
            grace_key = "TASKPOD_SHUTDOWN_GRACE_MS" if role == "api" else "TASKPOD_DRAIN_GRACE_MS"
            grace = int(env.get(grace_key, "10000")) / 1000
            if duration_secs(svc.get("stop_grace_period", "10s")) <= grace:
                problems.append(f"{name}: stop_grace_period must exceed {grace_key} ({grace}s)")
            if "TASKPOD_METRICS_LISTEN" not in env:
                problems.append(f"{name}: TASKPOD_METRICS_LISTEN is not set")
            if role == "api":
                page_keys.add(env.get("TASKPOD_PAGE_TOKENS__CURRENT_KEY", ""))
            else:
                names.add(env.get("TASKPOD_NAME"))
                if not env.get("TASKPOD_LOCK__URL", "").startswith("postgres"):
                    problems.append(f"{name}: TASKPOD_LOCK__URL (the direct lock-session URL) is not set")
        for value in env.values():
            if re.search(r"(localhost|127\.0\.0\.1)", value) and not value.startswith("0.0.0.0"):
                problems.append(f"{name}: an environment value points at the container itself: {value}")
    if len(page_keys) != 1 or len(next(iter(page_keys), "")) < 16:
        problems.append("the API replicas need one shared page-token key of at least 16 characters")
    if len(names) != len(workers):
        problems.append("worker names (TASKPOD_NAME) must be unique")
    pg_command = " ".join(map(str, services.get("postgres", {}).get("command") or []))
    for setting in ("tcp_keepalives_idle=5", "tcp_keepalives_interval=1",
                    "tcp_keepalives_count=3", "tcp_user_timeout=5000"):
        if setting not in pg_command:
            problems.append(f"postgres is not started with {setting}")
    prom_command = services.get("prometheus", {}).get("command") or []
    for flag in ("--web.enable-otlp-receiver", "--enable-feature=exemplar-storage"):
        if flag not in prom_command:
            problems.append(f"prometheus is not started with {flag}")
    # Prometheus scrapes exactly the taskpod services, on their metrics port.
    jobs = {j["job_name"]: j for j in prometheus.get("scrape_configs", [])}
    for job, members in (("taskpod-api", apis), ("taskpod-worker", workers)):
        want = sorted(f"{m}:{port_of(services[m]['environment']['TASKPOD_METRICS_LISTEN'])}" for m in members)
        got = sorted(t for sc in jobs.get(job, {}).get("static_configs", []) for t in sc["targets"])
        if want != got:
            problems.append(f"prometheus job {job} scrapes {got}, compose runs {want}")
    return problems


def check_compose() -> None:
    run(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yaml"],
        what="docker-compose.yaml against the compose spec")
    with tempfile.TemporaryDirectory() as tmp:
        bad = (ROOT / "docker-compose.yaml").read_text().replace("    healthcheck:\n", "    healthchek:\n", 1)
        Path(tmp, "bad.yaml").write_text(bad)
        must_fail(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", f"{tmp}/bad.yaml"],
                  "a compose file with a misspelt key (healthchek)", expect="healthchek")
    expect_no_problems("docker-compose.yaml", compose_problems(
        load_yaml(ROOT / "docker-compose.yaml"), load_yaml(DEPLOY / "prometheus/prometheus.yml"),
        load_yaml(DEPLOY / "otel-collector/config.yaml")))
    print("ok: compose")


# --- Prometheus ----------------------------------------------------------------------

def rule_exprs(rules: dict) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def prometheus_problems(prometheus: dict, rules: dict) -> list[str]:
    problems = []
    protocols = prometheus.get("global", {}).get("scrape_protocols") or []
    if not protocols or not protocols[0].startswith("OpenMetricsText"):
        problems.append("global.scrape_protocols must ask for OpenMetrics first (exemplars)")
    for job in prometheus.get("scrape_configs", []):
        own = job.get("scrape_protocols")
        if own and not own[0].startswith("OpenMetricsText"):
            problems.append(f"job {job['job_name']} does not ask for OpenMetrics first")
        for sc in job.get("static_configs", []):
            if set(sc.get("labels", {})) & {l for m in METRICS.values() for l in m["labels"]}:
                problems.append(f"job {job['job_name']} adds a target label that series carry themselves")
    for expr in rule_exprs(rules):
        problems += [f"rule {expr.split()[0]}...: {p}" for p in promql_problems(expr)]
    return problems


def check_prometheus() -> None:
    config = DEPLOY / "prometheus" / "prometheus.yml"
    data = load_yaml(config)
    with tempfile.TemporaryDirectory() as tmp:
        stripped = copy.deepcopy(data)
        for key in PROMETHEUS_V3_ONLY_GLOBAL_KEYS:
            stripped.get("global", {}).pop(key, None)
        Path(tmp, "prometheus.yml").write_text(yaml.safe_dump(stripped))
        shutil.copy(DEPLOY / "prometheus" / "rules.yml", Path(tmp, "rules.yml"))
        run(["promtool", "check", "config", f"{tmp}/prometheus.yml"], what="promtool check config")
        Path(tmp, "bad-rules.yml").write_text(
            "groups:\n  - name: bad\n    rules:\n      - alert: Broken\n        expr: sum(rate(x[5m])\n")
        must_fail(["promtool", "check", "rules", f"{tmp}/bad-rules.yml"], "a rule with unbalanced parentheses")
    run(["promtool", "check", "rules", "rules.yml"], cwd=DEPLOY / "prometheus", what="promtool check rules")
    run(["promtool", "test", "rules", "rules.test.yml"], cwd=DEPLOY / "prometheus", what="promtool test rules")
    expect_no_problems("deploy/prometheus", prometheus_problems(data, load_yaml(DEPLOY / "prometheus/rules.yml")))
    print("ok: prometheus")


# --- collector and Tempo -------------------------------------------------------------

def otel_problems(collector: dict, tempo: dict, compose: dict) -> list[str]:
    problems = []
    services = set(compose.get("services", {}))
    svc = collector.get("service", {})
    for pipeline, spec in svc.get("pipelines", {}).items():
        for kind in ("receivers", "processors", "exporters"):
            for component in spec.get(kind, []):
                if component not in (collector.get(kind) or {}):
                    problems.append(f"pipeline {pipeline} uses undefined {kind[:-1]} {component}")
        processors = spec.get("processors", [])
        if not processors or processors[0] != "memory_limiter" or "batch" not in processors:
            problems.append(f"pipeline {pipeline}: memory_limiter first, then batch")
    for ext in svc.get("extensions", []):
        if ext not in (collector.get("extensions") or {}):
            problems.append(f"extension {ext} is not defined")
    if "health_check" not in svc.get("extensions", []):
        problems.append("the health_check extension is not enabled")
    otlp = collector.get("receivers", {}).get("otlp", {}).get("protocols", {})
    if port_of(otlp.get("grpc", {}).get("endpoint", ":0")) != 4317 or port_of(otlp.get("http", {}).get("endpoint", ":0")) != 4318:
        problems.append("the OTLP receiver must listen on 4317 (gRPC) and 4318 (HTTP)")
    exporters = collector.get("exporters", {})
    traces = [exporters[e] for e in svc.get("pipelines", {}).get("traces", {}).get("exporters", []) if e in exporters]
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    if not any(e.get("endpoint") == f"tempo:{port_of(tempo_grpc)}" for e in traces):
        problems.append("traces are not exported to tempo's OTLP gRPC receiver")
    metrics = svc.get("pipelines", {}).get("metrics", {}).get("exporters", [])
    if not any(m.split("/")[0] == "otlphttp" and exporters[m].get("endpoint") == "http://prometheus:9090/api/v1/otlp"
               for m in metrics if m in exporters):
        problems.append("metrics are not exported with otlphttp to Prometheus's OTLP receiver")
    for e in exporters.values():
        host = urllib.parse.urlparse(e.get("endpoint", "") if "://" in e.get("endpoint", "") else "//" + e.get("endpoint", "")).hostname
        if host not in services:
            problems.append(f"exporter endpoint {e.get('endpoint')} is not a compose service")
    readers = svc.get("telemetry", {}).get("metrics", {}).get("readers", [])
    ports = [r["pull"]["exporter"]["prometheus"]["port"] for r in readers if "pull" in r]
    if 8888 not in ports:
        problems.append("the collector's own metrics are not served on :8888 (scraped as otel-collector)")
    if tempo.get("storage", {}).get("trace", {}).get("backend") != "local":
        problems.append("tempo must store blocks locally")
    if tempo.get("overrides", {}).get("defaults", {}).get("metrics_generator", {}).get("processors"):
        problems.append("tempo's metrics generator is meant to be off by default")
    return problems


def check_otel() -> None:
    expect_no_problems("deploy/otel-collector and deploy/tempo", otel_problems(
        load_yaml(DEPLOY / "otel-collector/config.yaml"), load_yaml(DEPLOY / "tempo/tempo.yaml"),
        load_yaml(ROOT / "docker-compose.yaml")))
    print("ok: otel collector and tempo")


# --- Grafana -------------------------------------------------------------------------

def all_panels(dashboard: dict):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def decode_explore(url: str) -> dict | None:
    """The panes of a Grafana Explore link, with Grafana's variables left in."""
    if not url.startswith("/explore?"):
        return None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    return json.loads(query["panes"][0])


def links_of(dashboard: dict):
    for link in dashboard.get("links", []):
        yield link.get("url", "")
    for panel in all_panels(dashboard):
        field = panel.get("fieldConfig", {})
        for link in field.get("defaults", {}).get("links", []):
            yield link.get("url", "")
        for override in field.get("overrides", []):
            for prop in override.get("properties", []):
                if prop.get("id") == "links":
                    for link in prop["value"]:
                        yield link.get("url", "")


def dashboard_problems(name: str, dashboard: dict, datasources: dict[str, str]) -> tuple[list[str], list[str]]:
    """Problems, and the PromQL expressions (for promtool)."""
    problems, exprs = [], []
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dashboard:
            problems.append(f"{name}: no {key}")

    def uses(ds, where):
        if not isinstance(ds, dict):
            problems.append(f"{name}: {where} names its datasource without a uid")
            return None
        uid = ds.get("uid")
        if uid not in datasources:
            problems.append(f"{name}: {where} uses datasource uid {uid!r}, which is not provisioned")
        elif ds.get("type") != datasources[uid]:
            problems.append(f"{name}: {where} says datasource {uid} is a {ds.get('type')}, it is a {datasources[uid]}")
        return uid

    for var in dashboard.get("templating", {}).get("list", []):
        if "datasource" in var:
            uid = uses(var["datasource"], f"variable {var['name']}")
            if uid == "prometheus":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
                if not m or m.group(2) not in (series_labels(m.group(1)) or set()):
                    problems.append(f"{name}: variable {var['name']} queries {query}, not a catalog label")
    for panel in all_panels(dashboard):
        where = f"panel {panel.get('title')!r}"
        if panel.get("type") in ("row", "text"):
            continue
        if "datasource" in panel:
            uses(panel["datasource"], where)
        for target in panel.get("targets", []):
            uid = uses(target.get("datasource"), where)
            if uid == "prometheus":
                expr = target.get("expr", "")
                exprs.append(expr)
                problems += [f"{name}: {where}: {p}" for p in promql_problems(expr)]
                latency = "histogram_quantile(" in expr or (panel["type"] == "heatmap" and "_bucket" in expr)
                if latency and target.get("exemplar") is not True:
                    problems.append(f"{name}: {where} shows a latency histogram without exemplars")
            elif uid == "postgres":
                sql = target.get("rawSql", "").strip()
                if not re.match(r"(?is)^(select|with)\b", sql) or ";" in sql:
                    problems.append(f"{name}: {where}: Postgres queries are single SELECTs")
    for url in links_of(dashboard):
        panes = decode_explore(url) if url else None
        for pane in (panes or {}).values():
            for q in pane.get("queries", []):
                uses(q.get("datasource"), f"link {url[:60]}...")
    return problems, exprs


def task_dashboard_problems(dashboard: dict) -> list[str]:
    """The task dashboard: a task_id variable, events from Postgres, and Tempo links that
    read the trace id out of the W3C traceparent."""
    problems = []
    names = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    if "task_id" not in names:
        problems.append("task dashboard: no task_id variable")
    sql = [t.get("rawSql", "") for p in all_panels(dashboard) for t in p.get("targets", [])]
    sql += [v.get("query", "") for v in dashboard.get("templating", {}).get("list", []) if isinstance(v.get("query"), str)]
    if not any("FROM events" in s and "${task_id:sqlstring}" in s for s in sql):
        problems.append("task dashboard: no query of the task's events")
    if not any("split_part(e.metadata->>'traceparent', '-', 2)" in s or "split_part(metadata->>'traceparent', '-', 2)" in s for s in sql):
        problems.append("task dashboard: the trace id is not read from the traceparent's second field")
    queries = []
    for url in links_of(dashboard):
        for pane in (decode_explore(url) or {}).values():
            queries += [(q.get("datasource", {}).get("uid"), q.get("query")) for q in pane.get("queries", [])]
    if ("tempo", '{ span.task_id = "${task_id}" }') not in queries:
        problems.append('task dashboard: no TraceQL link { span.task_id = "${task_id}" }')
    if ("tempo", "${__value.raw}") not in queries:
        problems.append("task dashboard: trace ids do not link to Tempo")
    return problems


def provisioning_problems(datasources: list[dict], compose: dict) -> list[str]:
    problems = []
    uids = {d.get("uid") for d in datasources}
    if len(uids) != len(datasources):
        problems.append("datasource uids must be unique and set")
    by_uid = {d.get("uid"): d for d in datasources}
    prom = by_uid.get("prometheus", {})
    dests = prom.get("jsonData", {}).get("exemplarTraceIdDestinations", [])
    if not any(d.get("name") == "trace_id" and d.get("datasourceUid") in uids and
               by_uid[d["datasourceUid"]]["type"] == "tempo" for d in dests):
        problems.append("Prometheus exemplars (label trace_id) do not point at the Tempo datasource")
    tempo = by_uid.get("tempo", {}).get("jsonData", {})
    for key in ("tracesToMetrics", "serviceMap"):
        if tempo.get(key, {}).get("datasourceUid") not in uids:
            problems.append(f"Tempo {key} does not point at a provisioned datasource")
    for q in tempo.get("tracesToMetrics", {}).get("queries", []):
        expr = q["query"].replace("$$__tags", "")
        problems += [f"tracesToMetrics {q['name']}: {p}" for p in promql_problems(expr)]
    text = yaml.safe_dump(datasources)
    if re.search(r"(?<!\$)\$__", text):
        problems.append("provisioning files expand $NAME: write Grafana's $__ macros as $$__")
    grafana_env = compose.get("services", {}).get("grafana", {}).get("environment", {})
    for var in re.findall(r"(?<!\$)\$\{?([A-Z_][A-Z0-9_]*)\}?", text):
        if var not in grafana_env:
            problems.append(f"provisioning reads ${var}, which the grafana service does not set")
    pg = by_uid.get("postgres", {})
    reader = (DEPLOY / "postgres" / "grafana-reader.sql").read_text()
    if pg.get("user") not in reader or "default_transaction_read_only = on" not in reader:
        problems.append("the Postgres datasource must log in as the read-only role of grafana-reader.sql")
    return problems


def grafana_datasources() -> list[dict]:
    return load_yaml(DEPLOY / "grafana/provisioning/datasources/datasources.yaml")["datasources"]


def dashboards(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            out[path.name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise Failed(f"{path}: not JSON: {e}")
    if not out:
        raise Failed(f"no dashboards in {folder}")
    return out


def check_grafana() -> None:
    compose = load_yaml(ROOT / "docker-compose.yaml")
    datasources = grafana_datasources()
    types = {d["uid"]: d["type"] for d in datasources}
    problems = provisioning_problems(datasources, compose)
    boards = dashboards(DEPLOY / "grafana/dashboards")
    exprs: list[str] = []
    uids = [d.get("uid") for d in boards.values()]
    if len(set(uids)) != len(uids):
        problems.append(f"dashboard uids repeat: {uids}")
    for name, board in boards.items():
        p, e = dashboard_problems(name, board, types)
        problems += p
        exprs += e
    task = [b for b in boards.values() if b.get("uid") == "taskpod-task"]
    problems += task_dashboard_problems(task[0]) if task else ["no task dashboard (uid taskpod-task)"]
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yaml")["providers"][0]
    mounts = compose["services"]["grafana"]["volumes"]
    if f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" not in mounts:
        problems.append("the dashboards provider does not read the folder compose mounts")
    # The chart's copies (helm cannot read files outside the chart).
    copies = CHART / "dashboards"
    for name in boards:
        copy_ = copies / name
        if not copy_.is_file() or copy_.read_bytes() != (DEPLOY / "grafana/dashboards" / name).read_bytes():
            problems.append(f"helm/taskpod/dashboards/{name} differs from deploy/grafana/dashboards (run scripts/sync-dashboards.sh)")
    extra = {p.name for p in copies.glob("*.json")} - set(boards)
    if extra:
        problems.append(f"helm/taskpod/dashboards has dashboards deploy/ does not: {sorted(extra)}")
    expect_no_problems("deploy/grafana", problems)
    promtool_parses(exprs)
    print(f"ok: grafana ({len(boards)} dashboards, {len(exprs)} PromQL queries)")


# --- Dockerfile ----------------------------------------------------------------------

def cargo_bins() -> list[str]:
    meta = json.loads(run(["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"]))
    return sorted(t["name"] for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"])


def script_bins() -> list[str]:
    return sorted(run(["scripts/build-binaries.sh", "--list"]).split())


def dockerfile_problems(content: str, bins: list[str], rust_version: str) -> list[str]:
    problems = []
    instructions = DockerfileParser(fileobj=io.BytesIO(content.encode())).structure
    stages: list[list[dict]] = []
    for ins in instructions:
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    if len(stages) < 2:
        return ["the Dockerfile must be multi-stage (a builder and a runtime)"]
    builder, final = stages[0], stages[-1]
    builder_from = builder[0]["value"].split()
    builder_name = builder_from[-1] if "AS" in [w.upper() for w in builder_from] else None
    args = {i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1] for i in instructions
            if i["instruction"] == "ARG" and "=" in i["value"]}
    image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), builder_from[0])
    if not re.fullmatch(rf"rust:{re.escape(rust_version)}(\.\d+)?(-slim)?-bookworm", image):
        problems.append(f"the builder is {image}, not the official rust:{rust_version} on bookworm")
    runs = [i["value"] for i in builder if i["instruction"] == "RUN"]
    if not any("scripts/build-binaries.sh --release" in r for r in runs):
        problems.append("the builder does not run scripts/build-binaries.sh --release")
    if not any("--mount=type=cache" in r and "cargo/registry" in r for r in runs):
        problems.append("the build has no cargo registry cache mount")
    users = [i["value"].strip() for i in final if i["instruction"] == "USER"]
    uid = users[-1].split(":")[0] if users else "0"
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"the final stage must run as a numeric non-root user, not {uid!r}")
    copied = []
    for ins in final:
        if ins["instruction"] == "COPY" and f"--from={builder_name}" in ins["value"]:
            words = [w for w in ins["value"].split() if not w.startswith("--")]
            copied += [Path(w).name for w in words[:-1]]
    if sorted(copied) != bins:
        problems.append(f"the image copies {sorted(copied)} from the builder; the workspace's binaries are {bins}")
    if not any(i["instruction"] == "STOPSIGNAL" and i["value"].strip() == "SIGTERM" for i in final):
        problems.append("the final stage has no STOPSIGNAL SIGTERM")
    labels = " ".join(i["value"] for i in final if i["instruction"] == "LABEL")
    for label in ("title", "source", "version", "revision", "licenses"):
        if f"org.opencontainers.image.{label}=" not in labels:
            problems.append(f"no OCI label org.opencontainers.image.{label}")
    cmd = [i["value"] for i in final if i["instruction"] in ("CMD", "ENTRYPOINT")]
    if not cmd or json.loads(cmd[-1])[0] not in bins:
        problems.append("the default command must be one of the binaries (exec form)")
    return problems


def dockerignore_problems(text: str) -> list[str]:
    """The build context keeps what the build reads: every workspace member, the proto
    contract, the migrations, the build script."""
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#")]
    problems = []
    if lines[:1] != ["*"]:
        problems.append(".dockerignore must start with * and list what the build needs")
    members = re.search(r"members\s*=\s*\[(.*?)\]", (ROOT / "Cargo.toml").read_text(), re.S).group(1)
    needed = {m.split("/")[0] + "/" for m in re.findall(r'"([^"]+)"', members)}
    needed |= {"Cargo.toml", "Cargo.lock", "proto/", "migrations/", "scripts/build-binaries.sh"}
    for path in sorted(needed):
        if f"!{path}" not in lines:
            problems.append(f".dockerignore leaves out {path}, which the build reads")
    return problems


def check_dockerfile() -> None:
    run(["hadolint", "--failure-threshold", "warning", "deploy/Dockerfile"], what="hadolint deploy/Dockerfile")
    must_fail(["hadolint", "--failure-threshold", "warning", "-"], "a Dockerfile FROM an untagged image",
              stdin="FROM debian\nUSER 65532\nCMD [\"true\"]\n", expect="DL3006")
    bins = cargo_bins()
    if script_bins() != bins:
        raise Failed(f"scripts/build-binaries.sh builds {script_bins()}, the workspace's binaries are {bins}")
    rust_version = re.search(r'rust-version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text()).group(1)
    expect_no_problems("deploy/Dockerfile", dockerfile_problems((DEPLOY / "Dockerfile").read_text(), bins, rust_version))
    expect_no_problems(".dockerignore", dockerignore_problems((ROOT / ".dockerignore").read_text()))
    if "scripts/build-binaries.sh" not in (ROOT / "scripts/test.sh").read_text():
        raise Failed("scripts/test.sh does not build the tests' binaries with scripts/build-binaries.sh")
    print(f"ok: dockerfile (ships {', '.join(bins)})")


# --- Helm ----------------------------------------------------------------------------

# The ServiceMonitor fields the chart renders (monitoring.coreos.com/v1), for the one
# kind the Kubernetes schemas do not cover. Partial: it catches misspelt and misplaced
# keys, not every rule the operator's CRD has.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "matchExpressions": {"type": "array", "items": {"type": "object", "required": ["key", "operator"]}}}},
                "scrapeProtocols": {"type": "array", "items": {"enum": [
                    "PrometheusProto", "OpenMetricsText0.0.1", "OpenMetricsText1.0.0", "PrometheusText0.0.4", "PrometheusText1.0.0"]}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}}}},
            },
        },
    },
}

HELM_CASES = ["", *sorted(str(p.relative_to(CHART)) for p in (CHART / "ci").glob("*.yaml"))]


def helm(*args) -> str:
    return run(["helm", *args], cwd=CHART, what="helm " + " ".join(args))


def render(values_file: str) -> list[dict]:
    args = ["template", "taskpod", ".", "--namespace", "taskpod"]
    if values_file:
        args += ["-f", values_file]
    return load_yaml_all(helm(*args))


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def rendered_problems(case: str, docs: list[dict], values: dict) -> list[str]:
    """What the rendered chart must hold for these values."""
    problems = []
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    fullname = "taskpod"
    existing = values.get("secrets", {}).get("existingSecret", "")
    keys = {**load_yaml(CHART / "values.yaml")["secrets"]["keys"], **values.get("secrets", {}).get("keys", {})}
    migrations = {"enabled": True, "hook": True, **values.get("migrations", {})}
    where = case or "default values"

    def p(msg):
        problems.append(f"{where}: {msg}")

    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    api, worker = deployments.get(f"{fullname}-api"), deployments.get(f"{fullname}-worker")
    if not api or not worker:
        return [f"{where}: the API and worker Deployments are missing"]
    configs = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind.get("ConfigMap", [])}
    keys_known = {"api": settings_keys("api"),
                  "worker": settings_keys("worker")}
    for role, dep in (("api", api), ("worker", worker)):
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        if c["command"] != [f"taskpod-{role}"]:
            p(f"{role} runs {c['command']}")
        config = configs.get(f"{fullname}-{role}")
        if config is None:
            p(f"{role}: no ConfigMap {fullname}-{role}")
            continue
        env = env_of(c)
        for name in list(config) + list(env):
            if name.startswith("TASKPOD_") and name not in PROCESS_VARIABLES:
                first = name.removeprefix("TASKPOD_").split("__")[0].lower()
                if first not in keys_known[role]:
                    p(f"{role}: {name} is not a taskpod-{role} setting")
        ports = {port["name"]: port["containerPort"] for port in c.get("ports", [])}
        main_port = port_of(config["TASKPOD_LISTEN" if role == "api" else "TASKPOD_HEALTH_LISTEN"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc = c.get(probe, {}).get("grpc")
            if not grpc or grpc.get("port") != main_port:
                p(f"{role}: {probe} is not a gRPC probe on {main_port}")
        if role == "api" and c["readinessProbe"]["grpc"].get("service") != "taskpod.v1.TaskService":
            p("api: readiness must ask about taskpod.v1.TaskService (NOT_SERVING during a drain)")
        if main_port not in ports.values() or port_of(config["TASKPOD_METRICS_LISTEN"]) != ports.get("metrics"):
            p(f"{role}: container ports do not match the listen settings")
        grace_ms = int(config["TASKPOD_SHUTDOWN_GRACE_MS" if role == "api" else "TASKPOD_DRAIN_GRACE_MS"])
        if pod["terminationGracePeriodSeconds"] * 1000 <= grace_ms:
            p(f"{role}: terminationGracePeriodSeconds does not cover the drain ({grace_ms} ms)")
        if role == "worker":
            live = c["livenessProbe"]
            # Kubernetes' defaults: every 10 s, 3 failures.
            if live.get("periodSeconds", 10) * live.get("failureThreshold", 3) * 1000 <= grace_ms:
                p("worker: the liveness probe would kill a draining worker (NOT_SERVING)")
            lock = env.get("TASKPOD_LOCK__URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
            if lock.get("key") != keys["lockUrl"]:
                p("worker: TASKPOD_LOCK__URL does not come from the Secret's lock-url key")
            if env.get("TASKPOD_NAME", {}).get("value") != "$(POD_NAME)":
                p("worker: TASKPOD_NAME is not the pod name")
        elif "TASKPOD_LOCK__URL" in env:
            p("api: has no lock session")
        if env.get("OTEL_SERVICE_NAME", {}).get("value") != f"taskpod-{role}":
            p(f"{role}: OTEL_SERVICE_NAME is not taskpod-{role}")
        attrs = env.get("OTEL_RESOURCE_ATTRIBUTES", {}).get("value", "")
        if "service.instance.id=$(POD_NAME)" not in attrs:
            p(f"{role}: OTEL_RESOURCE_ATTRIBUTES has no service.instance.id")
        if "service.namespace=" in attrs:
            p(f"{role}: service.namespace would turn the OTLP job label into <namespace>/taskpod-{role}")
    for doc in by_kind.get("Deployment", []) + by_kind.get("Job", []):
        pod = doc["spec"]["template"]["spec"]
        for c in containers(doc):
            sc = c.get("securityContext", {})
            pod_sc = pod.get("securityContext", {})
            what = f"{doc['kind']} {doc['metadata']['name']} container {c['name']}"
            if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
                p(f"{what}: needs readOnlyRootFilesystem and no privilege escalation")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                p(f"{what}: must drop ALL capabilities")
            if (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                p(f"{what}: needs the RuntimeDefault seccomp profile")
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                p(f"{what}: must run as non-root")
            for ref in c.get("envFrom", []):
                cm = ref.get("configMapRef", {}).get("name")
                if cm and not cm.startswith("taskpod-worker-extra") and ("ConfigMap", cm) not in names:
                    p(f"{what}: envFrom names ConfigMap {cm}, which is not rendered")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] != existing and ("Secret", ref["name"]) not in names:
                    p(f"{what}: {e['name']} reads Secret {ref['name']}, which is neither rendered nor existingSecret")
    secrets = [d for d in by_kind.get("Secret", []) if d["metadata"]["name"] == fullname]
    if existing and secrets:
        p("existingSecret is set, yet the chart renders its own Secret")
    if not existing and not secrets:
        p("no Secret rendered")
    for sec in secrets:
        data = sec.get("stringData", {})
        for k in ("storeUrl", "lockUrl", "pageTokenKey", "authTokens"):
            if keys[k] not in data:
                p(f"the Secret has no {keys[k]}")
        if len(data.get(keys["pageTokenKey"], "")) < 16:
            p("the page-token key is shorter than 16 characters")
    jobs = {d["metadata"]["name"]: d for d in by_kind.get("Job", [])}
    migrate = [j for n, j in jobs.items() if n.startswith(f"{fullname}-migrate")]
    if migrations["enabled"]:
        if len(migrate) != 1:
            p("expected one migrations Job")
        else:
            job = migrate[0]
            hook = job["metadata"].get("annotations", {}).get("helm.sh/hook")
            if migrations["hook"] and hook != "pre-install,pre-upgrade":
                p("the migrations Job is not a pre-install,pre-upgrade hook")
            if not migrations["hook"] and (hook or not re.search(r"-\d+$", job["metadata"]["name"])):
                p("with migrations.hook=false the Job must be plain and named per revision")
            c = job["spec"]["template"]["spec"]["containers"][0]
            if c["command"] != ["taskpod", "migrate"]:
                p("the migrations Job does not run taskpod migrate")
    tests = [j for j in by_kind.get("Job", []) if j["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    if len(tests) != 1:
        p("expected one helm test Job")
    else:
        cmds = [c["command"] for c in containers(tests[0])]
        services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}
        for cmd in cmds:
            if cmd[:3] != ["taskpod", "health", "--address"]:
                p(f"the test runs {cmd}, not taskpod health")
                continue
            url = urllib.parse.urlparse(cmd[3])
            svc = services.get(url.hostname)
            if not svc or url.port not in [x["port"] for x in svc["spec"]["ports"]]:
                p(f"the test probes {cmd[3]}, which no Service serves")
        if not any(urllib.parse.urlparse(c[3]).hostname == f"{fullname}-api" for c in cmds if len(c) > 3):
            p("the test does not probe the API Service")
    hpa = by_kind.get("HorizontalPodAutoscaler", [])
    autoscaling = values.get("api", {}).get("autoscaling", {}).get("enabled", True)
    if autoscaling != bool(hpa):
        p(f"api.autoscaling.enabled={autoscaling} but {len(hpa)} HPA rendered")
    if autoscaling and "replicas" in api["spec"]:
        p("with an HPA the Deployment must not set replicas")
    if hpa and hpa[0]["spec"]["scaleTargetRef"]["name"] != api["metadata"]["name"]:
        p("the HPA does not scale the API Deployment")
    pdbs = {d["metadata"]["name"] for d in by_kind.get("PodDisruptionBudget", [])}
    for role in ("api", "worker"):
        enabled = values.get(role, {}).get("podDisruptionBudget", {}).get("enabled", True)
        if enabled != (f"{fullname}-{role}" in pdbs):
            p(f"{role}: PodDisruptionBudget enabled={enabled} but rendered={f'{fullname}-{role}' in pdbs}")
    monitors = by_kind.get("ServiceMonitor", [])
    if values.get("metrics", {}).get("serviceMonitor", {}).get("enabled", False) != bool(monitors):
        p("metrics.serviceMonitor.enabled does not match what is rendered")
    for sm in monitors:
        try:
            import jsonschema
            jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
        except jsonschema.ValidationError as e:
            p(f"ServiceMonitor: {e.message}")
        selected = [s for s in by_kind.get("Service", []) if all(
            s["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
            and s["metadata"]["labels"].get("app.kubernetes.io/component") in ("api", "worker")]
        jobs_ = sorted(s["metadata"]["labels"].get(sm["spec"].get("jobLabel", ""), "") for s in selected)
        if jobs_ != ["taskpod-api", "taskpod-worker"]:
            p(f"the ServiceMonitor's jobs are {jobs_}, the dashboards expect taskpod-api and taskpod-worker")
        for s in selected:
            if "metrics" not in [x["name"] for x in s["spec"]["ports"]]:
                p(f"Service {s['metadata']['name']} has no metrics port")
    boards = {p_.name: p_.read_bytes().decode() for p_ in (DEPLOY / "grafana/dashboards").glob("*.json")}
    maps = [d for d in by_kind.get("ConfigMap", []) if "-dashboard-" in d["metadata"]["name"]]
    dash = {"label": "grafana_dashboard", "labelValue": "1", **values.get("dashboards", {})}
    rendered = {k: v for m in maps for k, v in m["data"].items()}
    if rendered != boards:
        p("the dashboard ConfigMaps do not carry exactly deploy/grafana/dashboards")
    for m in maps:
        if m["metadata"]["labels"].get(dash["label"]) != dash["labelValue"]:
            p(f"{m['metadata']['name']} lacks the sidecar label {dash['label']}={dash['labelValue']}")
    return problems


def values_doc_problems(text: str) -> list[str]:
    """Every value in values.yaml is documented: a key is either a section (its children
    are keys) or has a `# --` comment right above it."""
    problems = []
    lines = text.splitlines()
    documented_indent = None
    for n, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if documented_indent is not None:
            if indent > documented_indent:
                continue
            documented_indent = None
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-]+):(.*)$", line)
        if not m:
            continue
        block = []  # the comment lines right above
        for prev in reversed(lines[:n]):
            if not prev.strip().startswith("#"):
                break
            block.append(prev.strip())
        if any(c.startswith("# --") for c in block):
            documented_indent = indent
            continue
        following = next((l for l in lines[n + 1:] if l.strip() and not l.strip().startswith("#")), "")
        is_section = (m.group(3).strip() == "" and len(following) - len(following.lstrip()) > indent
                      and not following.strip().startswith("- "))
        if not is_section:
            problems.append(f"values.yaml line {n + 1}: {m.group(2)} has no `# --` comment")
    return problems


def check_helm() -> None:
    for case in HELM_CASES:
        helm("lint", "--strict", ".", *(["-f", case] if case else []))
        manifest = helm("template", "taskpod", ".", "--namespace", "taskpod", *(["-f", case] if case else []))
        run(["kubernetes-validate", "--strict", "--quiet", "-k", KUBE_VERSION, "-"], stdin=manifest,
            what=f"kubernetes-validate of the chart rendered with {case or 'default values'}")
        values = load_yaml(CHART / case) if case else {}
        expect_no_problems("helm/taskpod", rendered_problems(case, load_yaml_all(manifest), values))
        print(f"  rendered and valid: {case or 'default values'}")
    expect_no_problems("helm/taskpod/values.yaml", values_doc_problems((CHART / "values.yaml").read_text()))
    negative = {
        "api.replicaCount is not a number": ("api:\n  replicaCount: two\n", r"replicaCount.*want integer"),
        "an unknown key": ("api:\n  replicas: 3\n", r"additional properties 'replicas' not allowed"),
        "an unknown top-level key": ("replicaCount: 2\n", r"additional properties 'replicaCount' not allowed"),
        "a token hash that is not SHA-256": (
            "auth:\n  tokens:\n    - principal: ci\n      sha256: not-a-hash\n", r"sha256"),
        "a page-token key under 16 characters": ("secrets:\n  pageTokenKey: short\n", r"pageTokenKey"),
        "a termination grace shorter than the drain": (
            "worker:\n  terminationGracePeriodSeconds: 5\n", r"must exceed config.worker.drainGraceMs"),
        "no database URL and no existing Secret": ("secrets:\n  databaseUrl: \"\"\n", r"databaseUrl"),
        "a pull policy Kubernetes does not know": ("image:\n  pullPolicy: Sometimes\n", r"pullPolicy"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for what, (values, expect) in negative.items():
            path = Path(tmp, "bad.yaml")
            path.write_text(values)
            # helm template, not lint: helm 4's lint only logs a template's `fail`.
            must_fail(["helm", "template", "taskpod", ".", "-f", str(path)], what, expect=expect, cwd=CHART)
        # The rendered manifests are validated for real: a Deployment field the schema
        # does not know must fail.
        manifest = helm("template", "taskpod", ".", "--show-only", "templates/worker-deployment.yaml")
        must_fail(["kubernetes-validate", "--strict", "--quiet", "-k", KUBE_VERSION, "-"],
                  "a Deployment with an unknown field", stdin=manifest.replace("  revisionHistoryLimit:", "  revisionHistoryLimt:"))
    print("ok: helm")


# --- YAML ----------------------------------------------------------------------------

def yaml_files() -> list[str]:
    files = ["docker-compose.yaml", ".yamllint.yaml"]
    files += [str(p.relative_to(ROOT)) for p in sorted(DEPLOY.rglob("*.y*ml"))]
    files += [str(p.relative_to(ROOT)) for p in sorted(CHART.glob("*.yaml"))]
    files += [str(p.relative_to(ROOT)) for p in sorted((CHART / "ci").glob("*.yaml"))]
    return [f for f in files if (ROOT / f).is_file()]


def check_yaml() -> None:
    files = yaml_files()
    run(["yamllint", "--strict", "-c", ".yamllint.yaml", *files], what="yamllint")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bad.yaml").write_text("a: 1\na: 2\n")
        must_fail(["yamllint", "--strict", "-c", str(ROOT / ".yamllint.yaml"), f"{tmp}/bad.yaml"],
                  "a YAML file with a duplicated key", expect="duplication")
    print(f"ok: yaml ({len(files)} files)")


# --- selftest ------------------------------------------------------------------------

def selftest() -> None:
    """Each consistency check above, fed a broken input, must find the problem."""
    compose = load_yaml(ROOT / "docker-compose.yaml")
    prometheus = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    rules = load_yaml(DEPLOY / "prometheus/rules.yml")
    collector = load_yaml(DEPLOY / "otel-collector/config.yaml")
    tempo = load_yaml(DEPLOY / "tempo/tempo.yaml")
    datasources = grafana_datasources()
    types = {d["uid"]: d["type"] for d in datasources}
    boards = dashboards(DEPLOY / "grafana/dashboards")
    task = next(b for b in boards.values() if b["uid"] == "taskpod-task")
    overview = next(b for b in boards.values() if b["uid"] == "taskpod-overview")
    bins = cargo_bins()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    failures = []

    def case(what, problems, expect):
        if not any(re.search(expect, p) for p in problems):
            failures.append(f"{what}: expected a problem like /{expect}/, got {problems}")
        else:
            print(f"  caught: {what}")

    def mutated(value, edit):
        value = copy.deepcopy(value)
        edit(value)
        return value

    case("a metric that is not exported", promql_problems("rate(taskpod_tasks_started_total[5m])"), "not in deploy/metrics.yaml")
    case("a label a metric does not have", promql_problems('taskpod_pods_running{task_id="x"}'), "no label task_id")
    case("grouping by a label no series has", promql_problems("sum by (kind) (taskpod_pods_running)"), "grouping by kind")
    case("a histogram suffix on a counter", promql_problems("taskpod_tasks_created_total_bucket"), "not in deploy/metrics.yaml")
    case("compose: a misspelt TASKPOD_ variable",
         compose_problems(mutated(compose, lambda c: c["services"]["worker-1"]["environment"].update(TASKPOD_DRAIN_GRACE=1)), prometheus, collector),
         "TASKPOD_DRAIN_GRACE is not")
    case("compose: a healthcheck on the wrong port",
         compose_problems(mutated(compose, lambda c: c["services"]["api-2"]["healthcheck"].update(
             test=["CMD", "taskpod", "health", "--address", "http://127.0.0.1:50052"])), prometheus, collector),
         "does not probe TASKPOD_LISTEN")
    case("compose: a stop grace shorter than the drain",
         compose_problems(mutated(compose, lambda c: c["services"]["worker-2"].update(stop_grace_period="5s")), prometheus, collector),
         "stop_grace_period")
    case("compose: metrics pushed over OTLP",
         compose_problems(mutated(compose, lambda c: c["services"]["api-1"]["environment"].update(OTEL_METRICS_EXPORTER="otlp")), prometheus, collector),
         "OTEL_METRICS_EXPORTER")
    case("compose: depending on a service without a healthcheck",
         compose_problems(mutated(compose, lambda c: c["services"]["redis"].pop("healthcheck")), prometheus, collector),
         "no healthcheck")
    case("compose: a service.namespace that renames the OTLP job",
         compose_problems(mutated(compose, lambda c: c["services"]["api-1"]["environment"].update(
             OTEL_RESOURCE_ATTRIBUTES="service.namespace=taskpod,service.instance.id=api-1")), prometheus, collector),
         "service.namespace")
    case("compose: a worker Prometheus does not scrape",
         compose_problems(compose, mutated(prometheus, lambda p: p["scrape_configs"][1]["static_configs"][0]["targets"].pop()), collector),
         "taskpod-worker scrapes")
    case("prometheus: scraping without OpenMetrics",
         prometheus_problems(mutated(prometheus, lambda p: p["global"].pop("scrape_protocols")), rules), "OpenMetrics")
    case("prometheus: a rule on an unknown metric",
         prometheus_problems(prometheus, mutated(rules, lambda r: r["groups"][0]["rules"][0].update(expr="taskpod_nope > 1"))),
         "taskpod_nope")
    case("collector: a pipeline without memory_limiter",
         otel_problems(mutated(collector, lambda c: c["service"]["pipelines"]["traces"].update(processors=["batch"])), tempo, compose),
         "memory_limiter")
    case("collector: traces sent elsewhere",
         otel_problems(mutated(collector, lambda c: c["exporters"]["otlp/tempo"].update(endpoint="jaeger:4317")), tempo, compose),
         "tempo")
    case("grafana: an unprovisioned datasource uid",
         dashboard_problems("x", mutated(overview, lambda d: d["panels"][0].update(datasource={"type": "prometheus", "uid": "prom"})), types)[0],
         "not provisioned")
    case("grafana: a latency panel without exemplars",
         dashboard_problems("x", mutated(overview, lambda d: [t.pop("exemplar", None) for p in all_panels(d) for t in p.get("targets", [])]), types)[0],
         "without exemplars")
    case("grafana: the task dashboard without its TraceQL link",
         task_dashboard_problems(mutated(task, lambda d: d.update(links=d["links"][1:]))), "TraceQL")
    case("grafana: exemplars pointing nowhere",
         provisioning_problems(mutated(datasources, lambda ds: ds[0]["jsonData"]["exemplarTraceIdDestinations"][0].update(datasourceUid="jaeger")), compose),
         "exemplars")
    case("grafana: an unescaped $__ macro",
         provisioning_problems(mutated(datasources, lambda ds: ds[1]["jsonData"]["tracesToMetrics"]["queries"][0].update(
             query="rate(rpc_server_call_duration_seconds_count{$__tags}[5m])")), compose), r"\$\$__")
    case("dockerfile: root in the final stage",
         dockerfile_problems(dockerfile.replace("USER 65532:65532", "USER root"), bins, "1.95"), "non-root")
    case("dockerfile: a binary left out of the image",
         dockerfile_problems(dockerfile.replace(" /out/taskpod-worker", ""), bins, "1.95"), "copies")
    case("dockerfile: built without the shared script",
         dockerfile_problems(dockerfile.replace("scripts/build-binaries.sh --release --out /out", "cargo build --release"), bins, "1.95"),
         "build-binaries")
    case("dockerfile: another Rust", dockerfile_problems(dockerfile, bins, "1.94"), "rust:1.94")
    case(".dockerignore: the migrations left out",
         dockerignore_problems((ROOT / ".dockerignore").read_text().replace("!migrations/\n", "")), "migrations")
    docs = render("")

    def in_docs(kind, name, edit):
        def apply(ds):
            edit(next(d for d in ds if d["kind"] == kind and d["metadata"]["name"] == name))
        return rendered_problems("selftest", mutated(docs, apply), {})

    case("helm: an API readiness probe on the whole server",
         in_docs("Deployment", "taskpod-api", lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"].pop("service")),
         "taskpod.v1.TaskService")
    case("helm: an HTTP liveness probe",
         in_docs("Deployment", "taskpod-worker", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
             livenessProbe={"httpGet": {"port": 9464, "path": "/metrics"}})), "livenessProbe is not a gRPC probe")
    case("helm: a worker without its direct lock URL",
         in_docs("Deployment", "taskpod-worker", lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].__setitem__(
             slice(None), [e for e in d["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] != "TASKPOD_LOCK__URL"])),
         "TASKPOD_LOCK__URL")
    case("helm: a writable root filesystem",
         in_docs("Deployment", "taskpod-api", lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(
             readOnlyRootFilesystem=False)), "readOnlyRootFilesystem")
    case("helm: a dashboard ConfigMap that drifted",
         in_docs("ConfigMap", "taskpod-dashboard-task", lambda d: d["data"].update({"task.json": "{}"})), "dashboard ConfigMaps")
    case("helm: a test probing a Service that does not exist",
         in_docs("Job", "taskpod-test-health", lambda d: d["spec"]["template"]["spec"]["containers"][0]["command"].__setitem__(
             3, "http://taskpod-frontend:50051")), "no Service serves")
    case("helm: a short termination grace",
         in_docs("Deployment", "taskpod-worker", lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=5)),
         "does not cover the drain")
    case("helm: an undocumented value", values_doc_problems("api:\n  replicaCount: 2\n"), "no `# --` comment")
    if failures:
        raise Failed("the checks missed broken inputs:\n  - " + "\n  - ".join(failures))
    print("ok: selftest")


CHECKS = {
    "compose": check_compose,
    "helm": check_helm,
    "prometheus": check_prometheus,
    "otel": check_otel,
    "grafana": check_grafana,
    "dockerfile": check_dockerfile,
    "yaml": check_yaml,
    "selftest": selftest,
}


def main(argv: list[str]) -> int:
    names = argv or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"unknown check {unknown}; known: {' '.join(CHECKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        try:
            CHECKS[name]()
        except Failed as e:
            print(f"FAILED: {name}: {e}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
