"""The fault suite's count of repeats: an FCM repeat is allowed only after a lost answer."""

from __future__ import annotations

from scripts.dev.local_providers.control import AcceptedRecord
from scripts.harness.chaos_stack import answer_lost, tally


def accepted(provider: str, notification: str, device: str, message_id: str) -> AcceptedRecord:
    return AcceptedRecord(provider, "tok", message_id, notification, device, None, 100, 1.0)


def test_an_fcm_repeat_is_a_resend_only_for_a_push_whose_answer_was_lost() -> None:
    due = [("fcm", "n1", "d1"), ("fcm", "n2", "d2"), ("apns", "n3", "d3")]
    records = [
        accepted("fcm", "n1", "d1", "m1"),
        accepted("fcm", "n1", "d1", "m2"),  # its first send timed out: FCM cannot tell
        accepted("fcm", "n2", "d2", "m3"),
        accepted("fcm", "n2", "d2", "m4"),  # nothing was lost: sent twice for no reason
        accepted("apns", "n3", "d3", "a1"),
        accepted("apns", "n3", "d3", "a1"),  # the same apns-id
    ]
    t = tally(due, records, fcm_resends_allowed=False, fcm_answers_lost={("fcm", "n1", "d1")})
    assert (t.delivered, t.fcm_resends, t.duplicated, t.apns_resends) == (3, 1, 1, 1)
    assert t.examples["duplicated"] == ["('fcm', 'n2', 'd2') x2"]
    # Without a lost answer both FCM repeats are failures, as before.
    assert tally(due, records, fcm_resends_allowed=False).duplicated == 2


def test_a_lost_answer_is_a_send_that_may_have_left_without_an_answer() -> None:
    assert answer_lost(None, "timeout")
    assert answer_lost(None, "transport: timeout")  # libcurl
    assert answer_lost(None, "transport: ReadTimeout")  # firebase-admin's httpx
    assert answer_lost(None, "connection: recv_error")
    assert answer_lost(None, "client: MaxAttemptsExceeded")
    assert answer_lost(None, "DEADLINE_EXCEEDED")  # firebase-admin's name for a timeout
    assert not answer_lost(None, "circuit_open")  # held: never left
    assert not answer_lost(None, "rate_limited")
    assert not answer_lost(None, "held: per-domain pacing")  # a sender's own pacing
    assert not answer_lost(429, "QUOTA_EXCEEDED")  # the provider answered
    assert not answer_lost(503, "UNAVAILABLE")
