"""docker-compose.yml and scripts/deploy/Dockerfile agree with fanfare's settings and with each other.

No Docker engine is needed: the compose file is read with PyYAML (anchors and `<<` merges
resolved), and `docker compose config -q` runs only where the compose plugin is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from operators.config import ENV_VARIABLES, ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = "scripts/deploy/Dockerfile"
KAFKA_SERVICE = "kafka"
REDIS_SERVICE = "redis"

Service = Mapping[str, Any]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), (
        "docker-compose.yml has no services mapping"
    )
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    return compose["services"]  # type: ignore[no-any-return]


def environment(service: Service) -> dict[str, Any]:
    """A service's environment as a dict, from either compose form (mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value if sep else None for key, sep, value in pairs}
    return dict(env)


def depends_on(service: Service) -> dict[str, str]:
    """depends_on targets mapped to their condition (the list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def is_fanfare_service(service: Service) -> bool:
    build = service.get("build")
    return isinstance(build, Mapping) and build.get("dockerfile") == DOCKERFILE


def fanfare_services(services: Mapping[str, Service]) -> dict[str, Service]:
    found = {name: svc for name, svc in services.items() if is_fanfare_service(svc)}
    assert found, f"no service is built from {DOCKERFILE}"
    return found


def service_settings(name: str, service: Service) -> Settings:
    """The settings a fanfare service's environment gives, failing with the service's name."""
    try:
        return load_settings(environment(service))
    except ConfigError as exc:
        pytest.fail(f"service {name!r}: {exc}")


def has_healthcheck(service: Service) -> bool:
    check = service.get("healthcheck")
    if not check or check.get("disable"):
        return False
    test = check.get("test")
    return bool(test) and test != ["NONE"]


def published_ports(service: Service) -> Iterator[tuple[str | None, str, str]]:
    """(host_ip, host_port, container_port) for each of a service's port publications."""
    for port in service.get("ports") or []:
        if isinstance(port, Mapping):
            yield port.get("host_ip"), str(port.get("published", "")), str(port["target"])
            continue
        spec = str(port).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            yield parts[0].strip("[]"), parts[1], parts[2]
        elif len(parts) == 2:
            yield None, parts[0], parts[1]
        else:
            yield None, "", parts[0]


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """`NAME://host:port,...` as {NAME: (host, port)}."""
    found: dict[str, tuple[str, int]] = {}
    for entry in filter(None, (e.strip() for e in value.split(","))):
        name, _, address = entry.partition("://")
        host, _, port = address.rpartition(":")
        found[name] = (host, int(port))
    return found


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            instructions = []
        instructions.append((keyword, args.strip()))
    return instructions


# --- every service ------------------------------------------------------------------------------


def test_every_service_is_healthchecked_or_an_awaited_one_shot(
    services: dict[str, Service],
) -> None:
    waiting: dict[str, dict[str, str]] = {}
    for name, svc in services.items():
        for target, condition in depends_on(svc).items():
            waiting.setdefault(target, {})[name] = condition
    for name, svc in services.items():
        if has_healthcheck(svc):
            continue
        dependents = waiting.get(name, {})
        assert svc.get("restart", "no") == "no", (
            f"service {name!r} has no health check and restarts ({svc.get('restart')!r}): "
            "give it a health check, or make it a one-shot (restart: 'no')"
        )
        assert dependents, f"service {name!r} has no health check and nothing waits for it"
        not_waiting = {d: c for d, c in dependents.items() if c != "service_completed_successfully"}
        assert not not_waiting, (
            f"one-shot service {name!r}: dependents must wait for "
            f"service_completed_successfully, but {not_waiting} do not"
        )


def test_depends_on_targets_exist_and_conditions_fit(services: dict[str, Service]) -> None:
    for name, svc in services.items():
        for target, condition in depends_on(svc).items():
            assert target in services, f"{name} depends on {target!r}, which is not a service"
            if condition == "service_healthy":
                assert has_healthcheck(services[target]), (
                    f"{name} waits for {target} to be healthy, but {target} has no health check"
                )
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", (
                    f"{name} waits for {target} to complete, but {target} restarts"
                )
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition!r}"


def test_every_fanfare_variable_is_defined_in_config(services: dict[str, Service]) -> None:
    known = set(ENV_VARIABLES.values())
    unknown = {
        f"{name}: {var}"
        for name, svc in services.items()
        for var in environment(svc)
        if var.startswith("FANFARE_") and var not in known
    }
    assert not unknown, (
        f"docker-compose.yml uses FANFARE_* variables that operators/config.py does not define: "
        f"{sorted(unknown)}"
    )


def test_host_ports_bind_loopback_only(services: dict[str, Service]) -> None:
    for name, svc in services.items():
        assert svc.get("network_mode") != "host", f"{name} uses the host network"
        for host_ip, host_port, container_port in published_ports(svc):
            assert host_ip == "127.0.0.1", (
                f"{name} publishes {host_port or '?'}:{container_port} on "
                f"{host_ip or 'every interface'}; bind it to 127.0.0.1"
            )


# --- fanfare's services -------------------------------------------------------------------------


def test_fanfare_services_use_only_config_and_bytewax_variables(
    services: dict[str, Service],
) -> None:
    known = set(ENV_VARIABLES.values())
    for name, svc in fanfare_services(services).items():
        assert "env_file" not in svc, f"{name}: keep the environment in docker-compose.yml"
        other = [v for v in environment(svc) if v not in known and not v.startswith("BYTEWAX_")]
        assert not other, f"{name} sets {other}: neither FANFARE_* settings nor BYTEWAX_* variables"


def test_fanfare_service_environments_load_and_agree(services: dict[str, Service]) -> None:
    loaded = {}
    for name, svc in fanfare_services(services).items():
        env = environment(svc)
        not_strings = {k: v for k, v in env.items() if not isinstance(v, str)}
        assert not not_strings, f"{name}: quote these values so YAML keeps them strings"
        settings = service_settings(name, svc)
        assert str(settings.home) == "/var/lib/fanfare", name
        assert settings.replication_factor == 1, name
        loaded[name] = {k: v for k, v in env.items() if k.startswith("FANFARE_")}
    first_name, first = next(iter(loaded.items()))
    for name, env in loaded.items():
        assert env == first, f"{name} and {first_name} disagree on FANFARE_* settings"


def test_fanfare_image_builds_from_scripts_dockerfile(services: dict[str, Service]) -> None:
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        assert isinstance(build, Mapping), f"{name}: use the build mapping with a dockerfile"
        assert build.get("dockerfile") == DOCKERFILE, f"{name} builds from {build!r}"
        context = (REPO / build.get("context", ".")).resolve()
        assert context == REPO, f"{name}: the build context must be the repository root"
        assert (context / DOCKERFILE).is_file(), f"{DOCKERFILE} is missing"
    images = {svc.get("image") for svc in fanfare_services(services).values()}
    assert len(images) == 1, f"fanfare services should share one image, not {images}"


def test_dockerfile_entrypoint_is_fanfare_and_runs_as_non_root() -> None:
    stage = final_stage(REPO / DOCKERFILE)
    entrypoints = [args for keyword, args in stage if keyword == "ENTRYPOINT"]
    assert entrypoints, f"{DOCKERFILE}: the final stage has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["fanfare"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "fanfare" in pyproject["project"]["scripts"], "pyproject.toml defines no fanfare script"
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must not run as root"


def test_brokers_point_at_kafkas_internal_listener(services: dict[str, Service]) -> None:
    kafka_env = environment(services[KAFKA_SERVICE])
    advertised = listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    bound = listeners(kafka_env["KAFKA_LISTENERS"])
    internal = {n: hp for n, hp in advertised.items() if hp[0] == KAFKA_SERVICE}
    assert len(internal) == 1, f"expected one listener advertised as {KAFKA_SERVICE}:PORT"
    [(listener, (_, port))] = internal.items()
    assert bound[listener][1] == port, f"listener {listener} binds another port than it advertises"
    assert kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"] == listener
    host_ports = {int(c) for _, _, c in published_ports(services[KAFKA_SERVICE])}
    assert port not in host_ports, "the internal listener should not be the host's"
    for _, (host, host_port) in advertised.items():
        if host_port in host_ports:
            assert host == "127.0.0.1", "the host listener must advertise 127.0.0.1"
    for name, svc in fanfare_services(services).items():
        brokers = environment(svc)["FANFARE_KAFKA_BROKERS"].split(",")
        assert brokers == [f"{KAFKA_SERVICE}:{port}"], f"{name}: FANFARE_KAFKA_BROKERS={brokers}"
        # `store migrate` talks to Cassandra only, `outbox migrate` to PostgreSQL only.
        if svc["command"][:2] not in (["store", "migrate"], ["outbox", "migrate"]):
            assert depends_on(svc).get(KAFKA_SERVICE) == "service_healthy", name


def test_redis_url_points_at_the_redis_service(services: dict[str, Service]) -> None:
    assert REDIS_SERVICE in services
    for name, svc in fanfare_services(services).items():
        settings = service_settings(name, svc)
        assert settings.redis_url.startswith(f"redis://{REDIS_SERVICE}:6379/"), name


def test_topics_is_a_one_shot_that_fanout_waits_for(services: dict[str, Service]) -> None:
    topics = services["topics"]
    assert is_fanfare_service(topics)
    assert topics["command"] == ["topics", "create"]
    assert depends_on(topics) == {KAFKA_SERVICE: "service_healthy"}
    assert depends_on(services["fanout"]) == {
        KAFKA_SERVICE: "service_healthy",
        REDIS_SERVICE: "service_healthy",
        "topics": "service_completed_successfully",
        "store-migrate": "service_completed_successfully",
    }


def test_stores_are_cassandra_migrated_by_a_one_shot_every_flow_waits_for(
    services: dict[str, Service],
) -> None:
    migrate = services["store-migrate"]
    assert is_fanfare_service(migrate)
    assert migrate["command"][:2] == ["store", "migrate"]
    assert depends_on(migrate) == {"cassandra": "service_healthy"}
    for name in ("fanout", "delivery", "acks"):
        settings = service_settings(name, services[name])
        assert settings.resolved_store_url.startswith("cassandra://cassandra:9042/")
        assert settings.resolved_notification_store_url.startswith("cassandra://cassandra:9042/")
        assert depends_on(services[name])["store-migrate"] == "service_completed_successfully"


def test_fanout_service_serves_metrics_and_keeps_its_home(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    fanout = services["fanout"]
    assert fanout["command"] == ["run", "fanout", "--workers", "1"]
    settings = service_settings("fanout", fanout)
    # Bytewax's server: the dashboard's step panel; Prometheus scrapes it from its container.
    assert settings.metrics_server == "bytewax"
    port = settings.metrics_port
    assert ("127.0.0.1", str(port), str(port)) in set(published_ports(fanout))
    ready = settings.ready_port
    assert f"127.0.0.1:{ready}/ready" in " ".join(fanout["healthcheck"]["test"])
    mounts = {}
    for volume in fanout.get("volumes") or []:
        source, _, target = str(volume).partition(":")
        mounts[target.split(":")[0]] = source
    home = str(settings.home)
    assert home in mounts, f"fanout: FANFARE_HOME ({home}) is not on a volume"
    assert mounts[home] in (compose.get("volumes") or {}), "FANFARE_HOME must be a named volume"
    assert fanout.get("restart") in {"always", "unless-stopped", "on-failure"}


def test_cassandra_is_healthchecked_with_cqlsh(services: dict[str, Service]) -> None:
    cassandra = services["cassandra"]
    assert cassandra["image"].startswith("cassandra:4.1")
    assert "cqlsh -e 'describe keyspaces'" in " ".join(cassandra["healthcheck"]["test"])
    assert ("127.0.0.1", "9042", "9042") in set(published_ports(cassandra))


# --- the flows' services and their monitoring ---------------------------------------------------

FLOW_SERVICES = ("fanout", "delivery", "acks")
PROMETHEUS_SERVICE = "prometheus"
GRAFANA_SERVICE = "grafana"
# Bind mounts whose source the operator provides (push credentials): docker creates an empty
# directory when it is missing, and the delivery service then says that no provider is set.
OPERATOR_MOUNTS = {"./secrets"}


def mounts(service: Service) -> dict[str, str]:
    """{container path: source} of a service's volumes (short syntax; `:ro` dropped)."""
    found = {}
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        found[rest.split(":")[0]] = source
    return found


def bind_source(service: Service, target: str) -> Path:
    """The repository file mounted at `target` (a bind mount from the repository)."""
    source = mounts(service).get(target)
    assert source and source.startswith("./"), f"nothing from the repository is at {target}"
    return REPO / source


def test_every_flow_has_a_service_serving_metrics_on_its_own_host_port(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    host_ports = {}
    for name in FLOW_SERVICES:
        svc = services[name]
        assert is_fanfare_service(svc), name
        assert svc["command"][:2] == ["run", name], f"{name} runs {svc['command']}"
        assert service_settings(name, svc).metrics_server == "bytewax", name
        port = service_settings(name, svc).metrics_port
        published = [(ip, hp) for ip, hp, c in published_ports(svc) if c == str(port)]
        assert len(published) == 1, f"{name}: publish /metrics ({port}) once on 127.0.0.1"
        host_ports[name] = published[0][1]
        # Healthy when ready (changelogs read, broker and Redis answering), not merely alive.
        ready = service_settings(name, svc).ready_port
        assert f"127.0.0.1:{ready}/ready" in " ".join(svc["healthcheck"]["test"]), name
        home = str(service_settings(name, svc).home)
        assert mounts(svc).get(home) == "fanfare-home", f"{name}: FANFARE_HOME on fanfare-home"
        assert depends_on(svc).get(KAFKA_SERVICE) == "service_healthy", name
        assert depends_on(svc).get("topics") == "service_completed_successfully", name
        assert svc.get("restart") in {"always", "unless-stopped", "on-failure"}, name
    assert host_ports["fanout"] == "3030"
    assert len(set(host_ports.values())) == len(host_ports), f"host ports collide: {host_ports}"


def test_redis_is_not_published_where_the_quick_starts_redis_listens(
    services: dict[str, Service],
) -> None:
    published = {host_port for _, host_port, _ in published_ports(services[REDIS_SERVICE])}
    assert "6379" not in published, "the host's own Redis (the quick start's) listens on 6379"


def test_no_two_services_publish_the_same_host_port(services: dict[str, Service]) -> None:
    seen: dict[str, str] = {}
    for name, svc in services.items():
        for _, host_port, _ in published_ports(svc):
            assert host_port not in seen, f"{name} and {seen.get(host_port)} publish {host_port}"
            seen[host_port] = name


def test_every_mounted_repository_file_exists(services: dict[str, Service]) -> None:
    for name, svc in services.items():
        for target, source in mounts(svc).items():
            if source.startswith(("./", "../", "/")) and source not in OPERATOR_MOUNTS:
                assert (REPO / source).exists(), f"{name} mounts {source} at {target}: missing"


def test_prometheus_scrapes_every_flow_service(services: dict[str, Service]) -> None:
    prometheus = services[PROMETHEUS_SERVICE]
    assert has_healthcheck(prometheus)
    assert ("127.0.0.1", "9090", "9090") in set(published_ports(prometheus))
    config_path = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    config = yaml.safe_load(bind_source(prometheus, config_path).read_text(encoding="utf-8"))
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    expected = {
        f"{name}:{service_settings(name, services[name]).metrics_port}" for name in FLOW_SERVICES
    }
    expected.add(f"{API_SERVICE}:{service_settings(API_SERVICE, services[API_SERVICE]).api_port}")
    relay = service_settings(OUTBOX_RELAY, services[OUTBOX_RELAY])
    expected.add(f"{OUTBOX_RELAY}:{relay.outbox_metrics_port}")
    assert targets == expected
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"


API_SERVICE = "api"


def test_the_api_and_its_scheduler_run_as_services(services: dict[str, Service]) -> None:
    api = services[API_SERVICE]
    assert is_fanfare_service(api) and api["command"] == ["api"]
    settings = service_settings(API_SERVICE, api)
    # Inside its container on every interface, published on the host's loopback only.
    assert settings.api_host == "0.0.0.0"
    port = str(settings.api_port)
    assert [(ip, c) for ip, _, c in published_ports(api)] == [("127.0.0.1", port)]
    assert f"127.0.0.1:{port}/health" in " ".join(api["healthcheck"]["test"])
    scheduler = services["api-scheduler"]
    assert is_fanfare_service(scheduler) and scheduler["command"][:2] == ["api", "scheduler"]
    heartbeat = scheduler["command"][scheduler["command"].index("--heartbeat-file") + 1]
    assert heartbeat in " ".join(scheduler["healthcheck"]["test"])
    assert not list(published_ports(scheduler))
    for name in (API_SERVICE, "api-scheduler"):
        svc = services[name]
        assert depends_on(svc).get(REDIS_SERVICE) == "service_healthy", name
        assert depends_on(svc).get("topics") == "service_completed_successfully", name
        assert svc.get("restart") in {"always", "unless-stopped", "on-failure"}, name


def test_grafana_provisions_the_datasource_and_the_dashboard(services: dict[str, Service]) -> None:
    grafana = services[GRAFANA_SERVICE]
    assert has_healthcheck(grafana)
    assert depends_on(grafana) == {PROMETHEUS_SERVICE: "service_healthy"}
    assert ("127.0.0.1", "3000", "3000") in set(published_ports(grafana))
    provisioning = bind_source(grafana, "/etc/grafana/provisioning")
    [datasource] = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://{PROMETHEUS_SERVICE}:9090"
    [provider] = yaml.safe_load(
        (provisioning / "dashboards" / "fanfare.yml").read_text(encoding="utf-8")
    )["providers"]
    dashboards_dir = provider["options"]["path"]
    dashboards = bind_source(grafana, dashboards_dir)
    files = sorted(dashboards.glob("*.json"))
    assert files, f"no dashboard JSON in {dashboards}"
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/")
    assert (dashboards / home.removeprefix(dashboards_dir + "/")).is_file()
    for path in files:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert panels, path
        for panel in panels:
            uids = {panel["datasource"]["uid"]} | {t["datasource"]["uid"] for t in panel["targets"]}
            assert uids == {datasource["uid"]}, f"{path.name}: {panel['title']} uses {uids}"
            assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


# --- the outbox: PostgreSQL, its migration and the relay ----------------------------------------

POSTGRES_SERVICE = "postgres"
OUTBOX_RELAY = "outbox-relay"


def test_postgres_is_healthchecked_and_on_the_loopback_only(services: dict[str, Service]) -> None:
    postgres = services[POSTGRES_SERVICE]
    assert postgres["image"].startswith("postgres:")
    assert int(postgres["image"].split(":")[1].split("-")[0]) >= 14  # CREATE OR REPLACE TRIGGER
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    # Not 5432: the host's own PostgreSQL (the tests') may listen there.
    assert ("127.0.0.1", "15432", "5432") in set(published_ports(postgres))
    assert mounts(postgres).get("/var/lib/postgresql/data") == "postgres-data"


def test_outbox_url_points_at_the_postgres_service(services: dict[str, Service]) -> None:
    env = environment(services[POSTGRES_SERVICE])
    for name, svc in fanfare_services(services).items():
        url = service_settings(name, svc).outbox_url
        assert (
            url
            == f"postgresql://{env['POSTGRES_USER']}@{POSTGRES_SERVICE}:5432/" + env["POSTGRES_DB"]
        ), name


def test_the_relay_waits_for_its_table_the_broker_and_the_topics(
    services: dict[str, Service],
) -> None:
    migrate = services["outbox-migrate"]
    assert is_fanfare_service(migrate) and migrate["command"] == ["outbox", "migrate"]
    assert depends_on(migrate) == {POSTGRES_SERVICE: "service_healthy"}
    relay = services[OUTBOX_RELAY]
    assert is_fanfare_service(relay) and relay["command"] == ["outbox", "relay"]
    assert depends_on(relay) == {
        KAFKA_SERVICE: "service_healthy",
        POSTGRES_SERVICE: "service_healthy",
        "topics": "service_completed_successfully",
        "outbox-migrate": "service_completed_successfully",
    }
    settings = service_settings(OUTBOX_RELAY, relay)
    port = settings.outbox_metrics_port
    assert settings.metrics_host == "0.0.0.0"  # for Prometheus, from its own container
    assert ("127.0.0.1", str(port), str(port)) in set(published_ports(relay))
    assert f"127.0.0.1:{port}/metrics" in " ".join(relay["healthcheck"]["test"])
    assert relay.get("restart") in {"always", "unless-stopped", "on-failure"}


# --- docker compose itself, where it is installed -----------------------------------------------


def _compose_command() -> tuple[list[str] | None, str]:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"], ""
    standalone = shutil.which("docker-compose")
    if standalone:
        return [standalone], ""
    if docker:
        return None, "the docker CLI has no compose plugin (`docker compose version` failed)"
    return None, "neither `docker compose` nor `docker-compose` is installed"


def test_docker_compose_config_accepts_the_file() -> None:
    command, reason = _compose_command()
    if command is None:
        pytest.skip(reason)
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"docker compose config -q failed:\n{result.stderr}"


# --- the dashboard's queries against operators/metrics.py ----------------------------------------

DASHBOARDS = REPO / "scripts" / "deploy" / "grafana" / "dashboards"
CHANNELS = ("email", "sms", "webpush", "chat", "inapp")
# Metrics of other exporters the dashboard reads: Bytewax's API server and the client library.
FOREIGN_METRIC = re.compile(r"\b(?:bytewax|process)_\w+")


def fanfare_metrics() -> dict[str, tuple[str, ...]]:
    """{exposed series name: label names} of every metric operators/metrics.py defines."""
    from prometheus_client import Counter, Gauge, Histogram

    import operators.metrics
    from operators.metrics import WeightedHistogram

    out: dict[str, tuple[str, ...]] = {}
    for metric in vars(operators.metrics).values():
        labels = tuple(getattr(metric, "_labelnames", ()))
        if isinstance(metric, Counter):
            out[metric._name + "_total"] = labels
        elif isinstance(metric, Histogram | WeightedHistogram):
            name = metric.name if isinstance(metric, WeightedHistogram) else metric._name
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = (*labels, "le") if suffix == "_bucket" else labels
        elif isinstance(metric, Gauge):
            out[metric._name] = labels
    return out


def dashboard_panels() -> list[tuple[str, str | None, dict[str, Any]]]:
    """(file, title of the row above it or None, panel) for every non-row panel."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        row = None
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            if panel["type"] == "row":
                row = panel["title"]
                continue
            out.append((path.name, row, panel))
    return out


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: value}) for each `fanfare_*` selector in a PromQL expression."""
    found = []
    for m in re.finditer(r"\b(fanfare_\w+)(\{([^}]*)\})?", expr):
        matchers = dict(re.findall(r'(\w+)\s*!?=~?\s*"([^"]*)"', m.group(3) or ""))
        found.append((m.group(1), matchers))
    return found


def test_selectors_reads_metric_names_and_matchers() -> None:
    expr = (
        'histogram_quantile(0.5, sum by (le) (rate(fanfare_x_bucket{provider="sms", a!="b"}'
        "[$__rate_interval]))) / sum(fanfare_y_total)"
    )
    assert selectors(expr) == [
        ("fanfare_x_bucket", {"provider": "sms", "a": "b"}),
        ("fanfare_y_total", {}),
    ]


def test_every_dashboard_metric_and_label_exists_in_operators_metrics() -> None:
    known = fanfare_metrics()
    panels = dashboard_panels()
    assert panels
    for file, _, panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            found = selectors(expr)
            others = FOREIGN_METRIC.findall(expr)
            assert found or others, f"{file}: {panel['title']}: no metric in {expr!r}"
            for name, matchers in found:
                assert name in known, f"{file}: {panel['title']}: {name} is not in metrics.py"
                unknown = set(matchers) - set(known[name])
                assert not unknown, f"{file}: {panel['title']}: {name} has no label {unknown}"
            grouped = re.findall(r"\bby \(([^)]*)\)", expr)
            labels = {label.strip() for group in grouped for label in group.split(",")}
            if found and not others:
                have = set().union(*(known[name] for name, _ in found))
                assert labels <= have, f"{file}: {panel['title']}: by {labels - have} in {expr!r}"


def test_the_dashboard_has_a_row_per_channel_reading_that_channel() -> None:
    rows: dict[str, list[dict[str, Any]]] = {}
    for _, row, panel in dashboard_panels():
        if row is not None:
            rows.setdefault(row, []).append(panel)
    for channel in CHANNELS:
        [title] = [r for r in rows if r.endswith(f"({channel})")]
        exprs = [t["expr"] for p in rows[title] for t in p["targets"]]
        outcomes = [e for e in exprs if "fanfare_delivery_outcomes_total" in e]
        latency = [e for e in exprs if "fanfare_post_to_accepted_seconds_bucket" in e]
        held = [e for e in exprs if "fanfare_delivery_held_total" in e]
        assert outcomes and latency and held, title
        # A channel's row shows that channel: every provider-labelled selector names it.
        for expr in exprs:
            for name, matchers in selectors(expr):
                if "provider" in fanfare_metrics()[name]:
                    assert matchers.get("provider") == channel, f"{title}: {expr}"
    sms = [t["expr"] for p in rows["Channel: SMS (sms)"] for t in p["targets"]]
    for metric in ("fanfare_sms_cost_micros_total", "fanfare_sms_budget_refused_total"):
        assert any(metric in e for e in sms), metric
