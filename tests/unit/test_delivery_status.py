"""The status of an accepted notification, folded from its sends' outcomes (no I/O)."""

from __future__ import annotations

from operators.delivery.ledger import DeviceDelivery
from operators.delivery.status import channel_outcomes, recipient_status, status_counts


def row(device: str, provider: str, state: str, ack: str | None = None) -> DeviceDelivery:
    return DeviceDelivery(device, provider, state, 1, ack, 0.0)


def test_a_channel_is_as_far_as_its_furthest_device_got() -> None:
    rows = [
        row("phone", "apns", "invalid_token"),
        row("tablet", "fcm", "accepted"),
        row("browser", "webpush", "retry_scheduled"),
        row("mail", "email", "failed"),
        row("inapp", "inapp", "accepted", ack="opened"),
    ]
    assert channel_outcomes(rows) == {"push": "accepted", "email": "failed", "inbox": "opened"}
    # Delivered beats a provider's acceptance; a retry still under way beats a failure.
    assert channel_outcomes(
        [row("a", "apns", "accepted"), row("b", "fcm", "accepted", "delivered")]
    ) == {"push": "delivered"}
    assert channel_outcomes([row("a", "sms", "failed"), row("b", "sms", "retry_scheduled")]) == {
        "sms": "retry_scheduled"
    }
    assert channel_outcomes([]) == {}


def test_recipients_are_counted_overall_and_per_channel_with_no_send_where_none_was_made() -> None:
    recipients = [
        recipient_status("u1", [row("p", "apns", "accepted"), row("i", "inapp", "accepted")]),
        recipient_status("u2", [row("p", "fcm", "invalid_token"), row("i", "inapp", "accepted")]),
        recipient_status("u3", [row("p", "apns", "sending")]),
        recipient_status("u4", []),  # held, capped, no device... or not sent yet
    ]
    assert [r.status for r in recipients] == ["dispatched", "dispatched", "pending", "unknown"]
    assert recipients[1].channels == {"push": "invalid_token", "inbox": "accepted"}
    counts = status_counts(recipients, ("push", "inbox"))
    assert counts == {
        "recipient_status": {"dispatched": 2, "pending": 1, "unknown": 1},
        "channels": {
            "push": {"accepted": 1, "invalid_token": 1, "sending": 1, "no_send": 1},
            "inbox": {"accepted": 2, "no_send": 2},
        },
    }


def test_a_fallback_s_unused_channel_shows_no_send_and_an_unnamed_channel_still_counts() -> None:
    # A login code: push for u1, SMS for u2 (no device); the other channel has no send.
    recipients = [
        recipient_status("u1", [row("p", "apns", "accepted")]),
        recipient_status("u2", [row("s", "sms", "accepted")]),
    ]
    assert status_counts(recipients, ("push", "sms"))["channels"] == {
        "push": {"accepted": 1, "no_send": 1},
        "sms": {"no_send": 1, "accepted": 1},
    }
    # A record from before channels were kept names none: the channels seen are counted.
    assert status_counts(recipients, ())["channels"] == {
        "push": {"accepted": 1, "no_send": 1},
        "sms": {"no_send": 1, "accepted": 1},
    }
