"""`fanfare run`'s start-up checks, and the librdkafka log that no longer floods."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.runtime.logs import configure_logging
from flows.runtime.preflight import exit_code, startup_problems
from flows.runtime.readiness import CheckResult
from operators.adapters.kafka.client_log import REPEAT_AFTER_S, KafkaClientLog
from operators.config import Settings
from schemas.topics import ALL_TOPICS


def up(_settings: Settings, _timeout: float) -> CheckResult:
    return CheckResult(True, "answers")


def down(_settings: Settings, _timeout: float) -> CheckResult:
    return CheckResult(False, "Connection refused")


def every_topic(_settings: Settings) -> dict[str, int]:
    return dict.fromkeys(ALL_TOPICS, 2)


def settings(tmp_path: Path, **changes: object) -> Settings:
    return Settings(home=tmp_path, ready_port=0, metrics_port=1).with_overrides(**changes)


def test_nothing_to_say_when_everything_is_there(tmp_path: Path) -> None:
    s = settings(tmp_path, metrics_server="bytewax")  # no port of ours to check
    assert startup_problems(s, "acks", [], broker=up, redis=up, topics=every_topic) == []


def test_a_broker_down_is_one_line_and_no_topic_check(tmp_path: Path) -> None:
    s = settings(tmp_path, metrics_server="bytewax", kafka_brokers="kafka:9092")

    def topics(_s: Settings) -> dict[str, int]:
        raise AssertionError("no topic request to a broker that does not answer")

    [problem] = startup_problems(s, "acks", [], broker=down, redis=up, topics=topics)
    assert problem.code == 3
    assert problem.line.startswith("no Kafka broker answers at kafka:9092 (FANFARE_KAFKA_BROKERS")


def test_missing_topics_say_which_and_how_to_make_them(tmp_path: Path) -> None:
    s = settings(tmp_path, metrics_server="bytewax")
    [problem] = startup_problems(s, "acks", [], broker=up, redis=up, topics=lambda _s: {})
    assert problem.code == 3 and "run `fanfare topics create`" in problem.line
    assert f"{len(ALL_TOPICS)} of fanfare's topics" in problem.line


def test_redis_is_checked_only_for_the_flows_that_use_it(tmp_path: Path) -> None:
    s = settings(tmp_path, metrics_server="bytewax")
    assert startup_problems(s, "acks", [], broker=up, redis=down, topics=every_topic) == []
    [problem] = startup_problems(s, "fanout", [], broker=up, redis=down, topics=every_topic)
    assert problem.line.startswith("Redis does not answer at redis://127.0.0.1:6379/0")


def test_delivery_without_a_provider_is_a_configuration_error(tmp_path: Path) -> None:
    s = settings(tmp_path, metrics_server="bytewax")
    problems = startup_problems(s, "delivery", [], broker=up, redis=up, topics=every_topic)
    assert [p.code for p in problems] == [2] and "no push provider" in problems[0].line
    half = s.with_overrides(apns_key_file="/k.p8")
    [problem] = startup_problems(half, "delivery", [], broker=up, redis=up, topics=every_topic)
    assert "FANFARE_APNS_KEY_FILE is set but" in problem.line
    assert exit_code([*problems, *startup_problems(s, "fanout", [], broker=down, redis=up)]) == 2


def test_the_librdkafka_log_says_a_repeated_line_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    client_log = KafkaClientLog(clock=lambda: now[0])
    line = "%s [%s] %s"
    caplog.set_level(logging.INFO, "fanfare.kafka")
    for attempt in range(40):
        now[0] = attempt * 0.25  # a failed connection every 250 ms, as librdkafka retries
        fail = f"127.0.0.1:9092/bootstrap: Connect failed (after {attempt}ms in state CONNECT)"
        client_log.log(logging.ERROR, line, "FAIL", "rdkafka#consumer-1", fail)
    assert len(caplog.records) == 1
    now[0] = REPEAT_AFTER_S + 1
    client_log.log(logging.ERROR, line, "FAIL", "rdkafka#consumer-1", fail)
    assert len(caplog.records) == 2 and "(and 39 more like it" in caplog.records[1].getMessage()


def test_chatty_libraries_log_warnings_only_unless_debug() -> None:
    root, httpx = logging.getLogger(), logging.getLogger("httpx")
    before = root.level, httpx.level
    try:
        configure_logging("INFO")
        assert not httpx.isEnabledFor(logging.INFO)
        assert logging.getLogger("fanfare.supervisor").isEnabledFor(logging.INFO)
        configure_logging("DEBUG")
        assert httpx.isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(before[0])
        httpx.setLevel(before[1])


def test_delivery_refuses_a_broken_catalog_and_email_without_its_link_key(
    tmp_path: Path,
) -> None:
    s = settings(tmp_path, metrics_server="bytewax", apns_key_file="", fcm_credentials_file="")
    with_push = s.with_overrides(fcm_credentials_file=str(tmp_path / "fcm.json"))
    (tmp_path / "fcm.json").write_text('{"project_id": "p1"}')
    (tmp_path / "cats.toml").write_text("[categories.x]\ntier = 'urgent'\n")
    broken = with_push.with_overrides(categories_file=str(tmp_path / "cats.toml"))
    lines = [
        p.line
        for p in startup_problems(broken, "delivery", [], broker=up, redis=up, topics=every_topic)
    ]
    assert any(line.startswith("the delivery flow renders API notifications") for line in lines)
    mail = with_push.with_overrides(smtp_host="smtp.example.com")
    lines = [
        p.line
        for p in startup_problems(mail, "delivery", [], broker=up, redis=up, topics=every_topic)
    ]
    assert any("FANFARE_LINK_SECRET_FILE is not" in line for line in lines)
    (tmp_path / "link.key").write_text("k" * 64)
    keyed = mail.with_overrides(link_secret_file=str(tmp_path / "link.key"))
    assert startup_problems(keyed, "delivery", [], broker=up, redis=up, topics=every_topic) == []
