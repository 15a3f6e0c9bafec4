"""`fanfare metrics`, the scrape helpers and the metrics that fanfare adds to prometheus_client.

The endpoints are small HTTP servers in this process serving canned expositions.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from flows.runtime.metrics_scrape import (
    buckets,
    exposed_names,
    histogram_quantile,
    parse,
)
from operators import metrics
from scripts.cli import main
from scripts.commands import metrics as metrics_cli

FANOUT = """\
# HELP fanfare_posts_read_total post_created events decoded and valid
# TYPE fanfare_posts_read_total counter
fanfare_posts_read_total 5.0
fanfare_posts_read_created 1.7e9
# HELP fanfare_candidates_total follow edges examined for a post
# TYPE fanfare_candidates_total counter
fanfare_candidates_total 120.0
# HELP fanfare_suppressed_total candidates not notified, by reason
# TYPE fanfare_suppressed_total counter
fanfare_suppressed_total{reason="muted"} 7.0
fanfare_suppressed_total{reason="no_device"} 3.0
fanfare_suppressed_total{reason="capped"} 30.0
# HELP fanfare_bundle_summaries_total summary pushes
# TYPE fanfare_bundle_summaries_total counter
fanfare_bundle_summaries_total 1.0
# HELP fanfare_bundled_total notifications over the cap carried by summaries
# TYPE fanfare_bundled_total counter
fanfare_bundled_total 30.0
# HELP fanfare_dispatched_total dispatch items written, by provider and lane
# TYPE fanfare_dispatched_total counter
fanfare_dispatched_total{lane="normal",provider="apns"} 100.0
# HELP fanfare_dispatch_batches_total dispatch batches written
# TYPE fanfare_dispatch_batches_total counter
fanfare_dispatch_batches_total{lane="normal",provider="apns"} 4.0
# HELP fanfare_post_to_dispatched_seconds created to written
# TYPE fanfare_post_to_dispatched_seconds histogram
fanfare_post_to_dispatched_seconds_bucket{lane="normal",le="0.1",provider="apns"} 0.0
fanfare_post_to_dispatched_seconds_bucket{lane="normal",le="1.0",provider="apns"} 100.0
fanfare_post_to_dispatched_seconds_bucket{lane="normal",le="+Inf",provider="apns"} 100.0
fanfare_post_to_dispatched_seconds_count{lane="normal",provider="apns"} 100.0
fanfare_post_to_dispatched_seconds_sum{lane="normal",provider="apns"} 40.0
# HELP fanfare_consumer_lag_messages lag
# TYPE fanfare_consumer_lag_messages gauge
fanfare_consumer_lag_messages{partition="0",topic="post_created"} 4.0
fanfare_consumer_lag_messages{partition="1",topic="post_created"} 9.0
# HELP fanfare_acks_total acks
# TYPE fanfare_acks_total counter
# HELP bytewax_item_inp_count_total number of items this step has ingested
# TYPE bytewax_item_inp_count_total counter
bytewax_item_inp_count_total{step_id="fanout.claim_post",worker_index="0"} 5
"""

DELIVERY = """\
# HELP fanfare_posts_read_total post_created events decoded and valid
# TYPE fanfare_posts_read_total counter
fanfare_posts_read_total 0.0
# HELP fanfare_delivery_outcomes_total outcomes
# TYPE fanfare_delivery_outcomes_total counter
fanfare_delivery_outcomes_total{outcome="accepted",provider="apns"} 90.0
fanfare_delivery_outcomes_total{outcome="invalid_token",provider="apns"} 2.0
# HELP fanfare_provider_errors_total errors
# TYPE fanfare_provider_errors_total counter
fanfare_provider_errors_total{provider="apns",reason="Unregistered"} 2.0
# HELP fanfare_circuit_state circuit breaker per provider
# TYPE fanfare_circuit_state gauge
fanfare_circuit_state{provider="apns"} {state}
# HELP fanfare_dead_letters_written_total dead letters
# TYPE fanfare_dead_letters_written_total counter
fanfare_dead_letters_written_total{reason="failed",source_topic="push.apns"} 1.0
bytewax_item_inp_count_total{step_id="delivery.send_to_providers",worker_index="0"} 9
"""


class _Endpoint:
    def __init__(self, body: Callable[[], str]) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = body().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                endpoint.requests += 1

            def log_message(self, *args: object) -> None:
                pass

        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[], str]], _Endpoint]]:
    started: list[_Endpoint] = []

    def start(body: Callable[[], str]) -> _Endpoint:
        started.append(_Endpoint(body))
        return started[-1]

    yield start
    for ep in started:
        ep.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def row(out: str, label: str) -> str:
    [line] = [ln for ln in out.splitlines() if re.match(rf"\s+{re.escape(label)}\s{{2,}}", ln)]
    return line


# --- scrape helpers -----------------------------------------------------------------------------


def test_histogram_quantile_interpolates_like_promql() -> None:
    cum = [(0.1, 0.0), (1.0, 10.0), (math.inf, 10.0)]
    assert histogram_quantile(0.5, cum) == pytest.approx(0.55)
    assert histogram_quantile(0.99, cum) == pytest.approx(0.991)
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 5.0)]) == 1.0  # "at least 1 s"
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


def test_exposed_names_include_declared_families_and_histogram_series() -> None:
    names = exposed_names(FANOUT)
    assert {
        "fanfare_posts_read_total",
        "fanfare_acks_total",  # declared, no series yet
        "fanfare_post_to_dispatched_seconds",
        "fanfare_post_to_dispatched_seconds_bucket",
        "fanfare_post_to_dispatched_seconds_sum",
        "fanfare_post_to_dispatched_seconds_count",
        "bytewax_item_inp_count_total",
    } <= names
    assert "fanfare_candidates_total_bucket" not in names
    assert "fanfare_acks_total_count" not in names


def test_parse_keeps_fanfare_samples_and_drops_created() -> None:
    samples = parse(FANOUT)
    assert samples[("fanfare_posts_read_total", ())] == 5
    assert not any(name.endswith("_created") for name, _ in samples)
    assert not any(name.startswith("bytewax_") for name, _ in samples)
    assert buckets(samples, "fanfare_post_to_dispatched_seconds", lane="normal") == [
        (0.1, 0.0),
        (1.0, 100.0),
        (math.inf, 100.0),
    ]


def test_targets_normalise_to_metrics_urls() -> None:
    assert metrics_cli.normalize("3031") == "http://127.0.0.1:3031/metrics"
    assert metrics_cli.normalize("fanout:3030") == "http://fanout:3030/metrics"
    assert metrics_cli.normalize("http://h:1/") == "http://h:1/metrics"
    assert metrics_cli.normalize("http://h:1/custom") == "http://h:1/custom"


# --- fanfare's own metric types -----------------------------------------------------------------


def test_weighted_histogram_counts_a_batch_as_its_items() -> None:
    registry = CollectorRegistry()
    h = metrics.WeightedHistogram("t_seconds", "test", ["lane"], (0.5, 2), registry=registry)
    h.observe(("bulk",), 1.0, 500)
    h.observe(("bulk",), 0.5, 2)  # on a bound: counted in that bucket (le)
    h.observe(("bulk",), 9.0)
    samples = {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in (
            (s.name, s.labels, s.value) for fam in registry.collect() for s in fam.samples
        )
    }
    assert samples[("t_seconds_bucket", (("lane", "bulk"), ("le", "0.5")))] == 2
    assert samples[("t_seconds_bucket", (("lane", "bulk"), ("le", "2.0")))] == 502
    assert samples[("t_seconds_bucket", (("lane", "bulk"), ("le", "+Inf")))] == 503
    assert samples[("t_seconds_count", (("lane", "bulk"),))] == 503
    assert samples[("t_seconds_sum", (("lane", "bulk"),))] == pytest.approx(510.0)
    text = generate_latest(registry).decode()
    assert "# TYPE t_seconds histogram" in text


def test_observe_dispatched_measures_from_created_at() -> None:
    def count() -> float:
        return (
            parse(generate_latest().decode()).get(
                ("fanfare_post_to_dispatched_seconds_count", (("lane", "x"), ("provider", "t")))
            )
            or 0.0
        )

    before = count()
    metrics.observe_dispatched("t", "x", "2026-01-01T00:00:00Z", 3, now=1767225600.2)
    metrics.observe_dispatched("t", "x", "not a time", 5)  # ignored, never raises
    assert count() == before + 3


def test_dead_letter_reasons_are_bounded() -> None:
    assert metrics.dead_letter_reason("invalid_json: Expecting value") == "invalid_json"
    assert metrics.dead_letter_reason("dead_lettered: 500 InternalServerError") == "dead_lettered"
    assert metrics.dead_letter_reason("unexpected topic 'x' for the changelog input") == "other"
    assert metrics.dead_letter_reason("Schema: x") == "other"
    assert metrics.dead_letter_reason("") == "other"


# --- the command --------------------------------------------------------------------------------


def test_summary_sums_endpoints_and_names_the_unreachable(
    serve: Callable[[Callable[[], str]], _Endpoint], capsys: pytest.CaptureFixture[str]
) -> None:
    fanout = serve(lambda: FANOUT)
    open_circuit = serve(lambda: DELIVERY.replace("{state}", "2"))
    closed_circuit = serve(lambda: DELIVERY.replace("{state}", "0"))
    down = f"127.0.0.1:{closed_port()}"
    code = main(["metrics", fanout.url, open_circuit.url, closed_circuit.url, down])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 endpoint(s)" in out
    assert f"unreachable: http://{down}/metrics (" in out
    assert re.search(rf"127.0.0.1:{fanout.port}\s+fanout$", out, re.MULTILINE)
    assert re.search(rf"127.0.0.1:{open_circuit.port}\s+delivery$", out, re.MULTILINE)
    assert row(out, "posts read (valid)").split()[-1] == "5"
    assert row(out, "candidates (follow edges)").split()[-1] == "120"
    assert row(out, "suppressed, muted").split()[-1] == "7"
    assert row(out, "suppressed, self").split()[-1] == "0"  # every known reason is listed
    assert row(out, "suppressed, capped").split()[-1] == "30"
    assert row(out, "bundle summaries sent").split()[-5:] == [
        "1",
        "for",
        "30",
        "capped",
        "notifications",
    ]
    [dispatched] = [ln for ln in out.splitlines() if ln.endswith("batches")]
    assert dispatched.split() == ["apns", "normal", "100", "in", "4", "batches"]
    assert row(out, "accepted").split()[-1] == "180"  # two delivery processes
    assert row(out, "apns Unregistered").split()[-1] == "4"
    assert "apns open" in row(out, "circuit")  # the worst process wins
    assert row(out, "push.apns failed").split()[-1] == "2"
    assert row(out, "post_created").split()[1:] == ["13", "2", "partition(s),", "largest", "9"]
    # 100 items in (0.1, 1]: p50 interpolates to 0.55 s
    latency = out[out.index("post created -> dispatched") :]
    assert "p50 550 ms" in latency and "(100 items, since start)" in latency


def test_no_endpoint_answering_exits_1_with_a_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FANFARE_HOME", str(tmp_path))
    port = closed_port()
    assert main(["metrics", str(port)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"no endpoint answered (tried 127.0.0.1:{port})" in captured.err


def test_not_a_prometheus_endpoint_counts_as_unreachable(
    serve: Callable[[Callable[[], str]], _Endpoint], capsys: pytest.CaptureFixture[str]
) -> None:
    fanout = serve(lambda: FANOUT)
    html = serve(lambda: "<html>\n<body>{not metrics</body>\n")
    assert main(["metrics", fanout.url, html.url]) == 0
    assert f"unreachable: {html.url}" in capsys.readouterr().out


def test_default_finds_the_flows_running_from_fanfare_home(
    serve: Callable[[Callable[[], str]], _Endpoint],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    fanout = serve(lambda: FANOUT)
    monkeypatch.setenv("FANFARE_HOME", str(tmp_path))
    monkeypatch.setenv("FANFARE_METRICS_PORT", "1")  # this shell's: not what the flow uses
    # A stand-in supervisor: alive, with the FANFARE_METRICS_PORT its flow was started with;
    # two processes serve that port and the next.
    supervisor = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "FANFARE_METRICS_PORT": str(fanout.port - 1)},
    )
    try:
        run = tmp_path / "run"
        run.mkdir()
        info = {"flow": "fanout", "pid": supervisor.pid, "processes": 2, "process_id": None}
        (run / f"fanout-{supervisor.pid}.json").write_text(json.dumps(info))
        dead = {"flow": "acks", "pid": closed_pid(), "processes": 1, "process_id": None}
        (run / "acks-1.json").write_text(json.dumps(dead))
        assert main(["metrics"]) == 0
    finally:
        supervisor.kill()
        supervisor.wait()
    out = capsys.readouterr().out
    assert "1 endpoint(s)" in out
    assert f"unreachable: http://127.0.0.1:{fanout.port - 1}/metrics" in out
    assert re.search(rf"127.0.0.1:{fanout.port}\s+fanout$", out, re.MULTILINE)
    assert not (run / "acks-1.json").exists()  # a stale run file is ignored (and removed)


def closed_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_default_scans_from_the_metrics_port_when_no_flow_runs_here(
    serve: Callable[[Callable[[], str]], _Endpoint],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    fanout = serve(lambda: FANOUT)
    monkeypatch.setenv("FANFARE_HOME", str(tmp_path))
    monkeypatch.setenv("FANFARE_METRICS_PORT", str(fanout.port))
    assert main(["metrics", "--scan", "2"]) == 0
    out = capsys.readouterr().out
    assert f"127.0.0.1:{fanout.port}" in out
    assert f"no answer on 127.0.0.1:{fanout.port + 1}" in out or "1 endpoint(s)" in out


def test_watch_prints_rates_over_the_interval(
    serve: Callable[[Callable[[], str]], _Endpoint], capsys: pytest.CaptureFixture[str]
) -> None:
    posts = iter(range(0, 10_000, 10))
    ep = serve(
        lambda: FANOUT.replace(
            "fanfare_posts_read_total 5.0", f"fanfare_posts_read_total {next(posts)}"
        )
    )
    assert main(["metrics", "--watch", "0.5", "--count", "2", ep.url]) == 0
    out = capsys.readouterr().out
    first, second = out.split("\n\nfanfare metrics at ")
    assert "/s" not in first.splitlines()[3]  # no rates before a second sample
    _, total, rate = row(second, "posts read (valid)").rsplit(maxsplit=2)
    assert total == "10" and 10 <= float(rate) <= 25  # 10 more posts in ~0.5 s
    assert row(second, "candidates (follow edges)").split()[-1] == "0.0"


def test_watch_and_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["metrics", "--watch", "0", "1"]) == 2
    assert "above 0" in capsys.readouterr().err


def test_a_handful_of_latencies_shows_a_bound_not_percentiles() -> None:
    samples = {
        ("fanfare_accept_latency_seconds_bucket", (("le", "0.5"),)): 0.0,
        ("fanfare_accept_latency_seconds_bucket", (("le", "1.0"),)): 1.0,
        ("fanfare_accept_latency_seconds_bucket", (("le", "+Inf"),)): 1.0,
    }
    report = metrics_cli.Report(samples, None, 0.0)
    report.latency(0, "post -> accepted", "fanfare_accept_latency_seconds")
    assert report.lines == [f"{'post -> accepted':<44}1 item: all within 1.00 s"]
