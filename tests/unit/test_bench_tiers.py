"""The tier benchmark's arguments, published records and latency summary (no processes)."""

from __future__ import annotations

import pytest

from schemas.codecs import decode_notification_request, encode_notification_request
from scripts.bench.tiers import (
    CAMPAIGN,
    build_parser,
    campaign_request,
    latency_row,
    main,
    probe_request,
    seed_users,
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--users", "3"], "out of range"),
        (["--users", "lots"], "is not a whole number"),
        (["--rate", "0"], "--rate"),
        (["--users", "10", "--probe-recipients", "20"], "more than --users"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_issue_s_sizes() -> None:
    args = build_parser().parse_args([])
    assert (args.users, args.rate, args.probe_recipients) == (200_000, 2.0, 3)


def test_the_campaign_is_one_marketing_message_per_user_as_the_scheduler_emits() -> None:
    request = campaign_request(CAMPAIGN, "u0000001")
    assert request.tier == "marketing" and request.recipients == ("u0000001",)
    assert request.key == f"{CAMPAIGN}:u0000001"
    assert request.quiet_hours and request.caps
    assert decode_notification_request(encode_notification_request(request)) == request


def test_a_probe_is_a_transactional_login_code_without_quiet_hours_or_caps() -> None:
    request = probe_request("n_tier1", ("u1", "u2", "u3"))
    assert (request.tier, request.category, request.channels) == (
        "transactional",
        "login_code",
        ("push",),
    )
    assert not request.quiet_hours and not request.caps
    assert request.key == "n_tier1"


def test_seeded_users_alternate_apns_and_fcm_and_include_the_warm_up_users() -> None:
    seed = seed_users(10)
    assert seed.users == 18 and list(seed.apns[:4]) == [1, 0, 1, 0]
    assert all(seed.eligible(i) for i in range(seed.users))


def test_latency_row_is_in_milliseconds_and_ordered() -> None:
    row = latency_row([0.1 * i for i in range(1, 101)])
    assert row["pushes"] == 100
    assert row["p50_ms"] == pytest.approx(5000, abs=100)
    assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] == pytest.approx(10_000)
    assert latency_row([])["p99_ms"] is None
