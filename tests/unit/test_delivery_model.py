from __future__ import annotations

import pytest

from operators.delivery.model import (
    Action,
    LedgerRow,
    ProviderAnswer,
    RetryPolicy,
    Verdict,
    classify,
    decide,
    plan_retry,
)
from tests.fakes import request

R = request(source="push.apns/0@7")


@pytest.mark.parametrize(
    ("row", "req", "action"),
    [
        (None, R, Action.SEND),
        (LedgerRow("push.apns/0@7", "sending", 0, 0), R, Action.RESEND),
        (LedgerRow("push.apns/0@7", "accepted", 1, 0), R, Action.REEMIT),
        (LedgerRow("push.apns/0@7", "retry_scheduled", 1, 1), R, Action.REEMIT),
        (LedgerRow("push.apns/3@9", "sending", 0, 0), R, Action.SKIP),
        (LedgerRow("push.apns/3@9", "accepted", 1, 0), R, Action.SKIP),
        # A retry takes over only the row that waits for exactly it.
        (
            LedgerRow("push.apns/0@7", "retry_scheduled", 1, 1),
            request(source="push.retry/0@3", seq=1),
            Action.SEND,
        ),
        (
            LedgerRow("push.apns/0@7", "retry_scheduled", 2, 2),
            request(source="push.retry/0@3", seq=1),
            Action.SKIP,
        ),
        (
            LedgerRow("push.retry/0@3", "accepted", 2, 1),
            request(source="push.retry/1@5", seq=1),
            Action.SKIP,
        ),
        (
            LedgerRow("push.retry/0@3", "sending", 1, 1),
            request(source="push.retry/0@3", seq=1),
            Action.RESEND,
        ),
    ],
)
def test_ledger_rules(row: LedgerRow | None, req: object, action: Action) -> None:
    assert decide(req, row) is action  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("provider", "answer", "verdict"),
    [
        ("apns", ProviderAnswer(200, None), Verdict.ACCEPTED),
        ("apns", ProviderAnswer(410, "Unregistered"), Verdict.INVALID_TOKEN),
        ("apns", ProviderAnswer(400, "BadDeviceToken"), Verdict.INVALID_TOKEN),
        ("apns", ProviderAnswer(400, "BadTopic"), Verdict.PERMANENT),
        ("apns", ProviderAnswer(413, "PayloadTooLarge"), Verdict.PERMANENT),
        ("apns", ProviderAnswer(403, "InvalidProviderToken"), Verdict.PERMANENT),
        ("apns", ProviderAnswer(403, "ExpiredProviderToken"), Verdict.TRANSIENT),
        ("apns", ProviderAnswer(429, "TooManyRequests"), Verdict.TRANSIENT),
        ("apns", ProviderAnswer(500, "InternalServerError"), Verdict.TRANSIENT),
        ("apns", ProviderAnswer(503, "ServiceUnavailable"), Verdict.TRANSIENT),
        ("apns", ProviderAnswer(None, "timeout"), Verdict.TRANSIENT),
        ("fcm", ProviderAnswer(200, None), Verdict.ACCEPTED),
        ("fcm", ProviderAnswer(404, "UNREGISTERED"), Verdict.INVALID_TOKEN),
        ("fcm", ProviderAnswer(403, "SENDER_ID_MISMATCH"), Verdict.INVALID_TOKEN),
        (
            "fcm",
            ProviderAnswer(
                400,
                "INVALID_ARGUMENT",
                detail="The registration token is not a valid FCM registration token",
            ),
            Verdict.INVALID_TOKEN,
        ),
        (
            "fcm",
            ProviderAnswer(400, "INVALID_ARGUMENT", detail="Message is too big"),
            Verdict.PERMANENT,
        ),
        ("fcm", ProviderAnswer(429, "QUOTA_EXCEEDED", 30), Verdict.TRANSIENT),
        ("fcm", ProviderAnswer(503, "UNAVAILABLE"), Verdict.TRANSIENT),
        ("fcm", ProviderAnswer(500, "INTERNAL"), Verdict.TRANSIENT),
        ("fcm", ProviderAnswer(401, "THIRD_PARTY_AUTH_ERROR"), Verdict.TRANSIENT),
        ("fcm", ProviderAnswer(None, "transport: ConnectError"), Verdict.TRANSIENT),
    ],
)
def test_classify(provider: str, answer: ProviderAnswer, verdict: Verdict) -> None:
    assert classify(provider, answer) is verdict  # type: ignore[arg-type]


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    policy = RetryPolicy(base_s=1.0, max_backoff_s=10.0)
    assert policy.backoff(1, lambda: 1.0) == 1.0
    assert policy.backoff(2, lambda: 1.0) == 2.0
    assert policy.backoff(4, lambda: 1.0) == 8.0
    assert policy.backoff(9, lambda: 1.0) == 10.0  # capped
    assert policy.backoff(4, lambda: 0.0) == 0.0  # full jitter reaches zero
    assert policy.backoff(4, lambda: 0.25) == 2.0


def test_plan_retry_caps_attempts_and_age_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=3, base_s=1.0, max_backoff_s=60, max_age_s=100)
    r = request(created_ts=1_000.0)
    assert plan_retry(policy, r, 1, 1_010.0, None, lambda: 0.5).due_at == 1_010.5
    assert plan_retry(policy, r, 1, 1_010.0, 30.0, lambda: 0.5).due_at == 1_040.0
    assert plan_retry(policy, r, 3, 1_010.0, None, lambda: 0.5).kind == "dead_lettered"
    # Due after the age cap: not worth sending any more.
    assert plan_retry(policy, r, 2, 1_095.0, 10.0, lambda: 0.5).kind == "expired"
    assert policy.expired(1_000.0, 1_100.5)
    assert not policy.expired(1_000.0, 1_099.0)


def test_the_apns_id_is_uuid5_of_notification_and_device() -> None:
    """Computed without uuid.UUID objects, it must stay byte for byte uuid5's."""
    import uuid

    from operators.delivery import model
    from tests.fakes import request

    for i in range(500):
        r = request(f"u{i}", f"d-{i}\u00e9")
        name = f"{r.item['notification_id']}|{r.item['device_id']}"
        assert r.apns_id == str(uuid.uuid5(model._APNS_NS, name))
