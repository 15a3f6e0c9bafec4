"""Request rules, keys and scopes, fingerprints, audiences: the API's domain without I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from operators.adapters.catalog_files import load_catalog
from operators.notify.campaigns import refill
from operators.notify.keys import (
    ENDPOINT_SCOPES,
    new_key,
    parse_scope_list,
    secret_matches,
    split_key,
)
from operators.notify.requests import (
    MAX_RECIPIENTS,
    NotifyRequest,
    Rejected,
    fingerprint,
    plan_notification,
    request_id,
    resolve_fallback,
)
from operators.notify.service import parse_audience
from schemas.codecs import decode_notification_request, encode_notification_request

CATALOG = load_catalog()
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
LOGIN = {"code": "482913", "minutes": 10}


def plan(**changes: object) -> object:
    fields: dict[str, object] = {
        "idempotency_key": "k1",
        "category": "login_code",
        "template_id": "login_code",
        "recipients": ["u1", "u2"],
        "data": LOGIN,
    }
    fields.update(changes)
    return plan_notification(
        CATALOG,
        NotifyRequest(**fields),  # type: ignore[arg-type]
        notification_id="n_1",
        api_key_id="key1",
        now=NOW,
    )


def rejected(**changes: object) -> Rejected:
    with pytest.raises(Rejected) as caught:
        plan(**changes)
    return caught.value


def test_a_request_becomes_an_event_with_the_categorys_policy() -> None:
    event = plan(recipients=["u1", "u2", "u1"])
    assert event.tier == "transactional"  # type: ignore[attr-defined]
    assert event.recipients == ("u1", "u2")  # type: ignore[attr-defined]
    # login_code: push, then SMS for a user push cannot reach.
    assert event.channels == ("push", "sms")  # type: ignore[attr-defined]
    assert event.fallback == ("push", "sms")  # type: ignore[attr-defined]
    assert (event.quiet_hours, event.caps) == (False, False)  # type: ignore[attr-defined]
    assert decode_notification_request(encode_notification_request(event)) == event  # type: ignore[arg-type]
    social = plan(
        category="new_post",
        template_id="new_post",
        data={"author_name": "Ann", "excerpt": "hello", "post_id": "p1"},
        channels=["inbox", "push"],
    )
    assert social.tier == "social" and social.channels == ("push", "inbox")  # type: ignore[attr-defined]
    assert social.fallback == ()  # type: ignore[attr-defined]


def test_a_request_carries_its_category_s_own_cap() -> None:
    campaign = replace(CATALOG.categories["campaign"], cap=3, cap_window_s=604_800)
    catalog = replace(CATALOG, categories={**CATALOG.categories, "campaign": campaign})
    request = NotifyRequest(
        idempotency_key="k1",
        category="campaign",
        template_id="campaign",
        recipients=("u1",),
        data={"headline": "Sale", "message": "-20%", "link": "fanfare://sale"},
    )
    event = plan_notification(catalog, request, notification_id="n_1", api_key_id="k", now=NOW)
    assert (event.caps, event.cap_limit, event.cap_window_s) == (True, 3, 604_800)
    assert decode_notification_request(encode_notification_request(event)) == event
    # A category without its own: none, the fan-out's default applies.
    plain = plan_notification(CATALOG, request, notification_id="n_1", api_key_id="k", now=NOW)
    assert (plain.cap_limit, plain.cap_window_s) == (None, None)


def test_a_request_naming_channels_keeps_the_fallback_among_them() -> None:
    only_push = plan(channels=["push", "inbox"])
    assert only_push.channels == ("push", "inbox") and only_push.fallback == ()  # type: ignore[attr-defined]
    both = plan(channels=["sms", "push", "inbox"])
    assert both.channels == ("push", "inbox", "sms")  # type: ignore[attr-defined]
    assert both.fallback == ("push", "sms")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"category": "nope"}, "unknown_category", "category"),
        ({"template_id": "nope"}, "unknown_template", "template_id"),
        ({"template_id": "receipt"}, "template_category_mismatch", "template_id"),
        ({"data": {"code": "1"}}, "missing_template_data", "data"),
        (
            {"recipients": [f"u{i}" for i in range(MAX_RECIPIENTS + 1)]},
            "too_many_recipients",
            "recipients",
        ),
        ({"recipients": []}, "invalid_request", "recipients"),
        ({"send_at": NOW + timedelta(days=31)}, "invalid_send_at", "send_at"),
        ({"send_at": datetime(2026, 12, 7, 9, 0)}, "invalid_send_at", "send_at"),
        ({"channels": []}, "invalid_channels", "channels"),
        (
            {
                "category": "receipt",
                "template_id": "receipt",
                "data": {"order_id": "1", "amount": "1", "currency": "EUR"},
                "channels": ["email", "sms"],
            },
            "channel_not_allowed",
            "channels",
        ),
    ],
)
def test_each_rule_names_its_code_and_field(
    changes: dict[str, object], code: str, field: str
) -> None:
    error = rejected(**changes)
    assert (error.code, error.field) == (code, field)
    assert error.message


def test_data_that_does_not_render_is_refused() -> None:
    error = rejected(
        category="new_post",
        template_id="new_post",
        data={"author_name": "Ann", "excerpt": 5, "post_id": "p1"},  # truncate() needs text
    )
    assert error.code == "template_render_failed"


def test_a_key_is_shown_once_and_only_its_hash_is_kept() -> None:
    made = new_key("orders", frozenset({"send"}), frozenset({"receipt"}), 5.0, 10, 1.0)
    parts = split_key(made.text)
    assert parts is not None and parts[0] == made.record.key_id
    assert parts[1] not in repr(made.record)
    assert secret_matches(parts[1], made.record)
    assert not secret_matches(parts[1][:-1] + "x", made.record)
    assert split_key("ffk_nothex_" + parts[1]) is None
    assert split_key("Bearer " + made.text) is None
    assert made.record.allows_endpoint("send") and not made.record.allows_endpoint("campaigns")
    assert made.record.allows_category("receipt") and not made.record.allows_category("login_code")


def test_scope_lists() -> None:
    assert parse_scope_list("send, status", ENDPOINT_SCOPES, "endpoint scopes") == {
        "send",
        "status",
    }
    assert parse_scope_list("*", None, "categories") == {"*"}
    with pytest.raises(ValueError, match="unknown endpoint scopes \\['sned'\\]"):
        parse_scope_list("sned", ENDPOINT_SCOPES, "endpoint scopes")
    with pytest.raises(ValueError, match="at least one"):
        parse_scope_list(" , ", None, "categories")


def test_ids_come_from_the_api_key_and_the_idempotency_key() -> None:
    first = request_id("n", "key1", "order-1")
    assert first == request_id("n", "key1", "order-1") and first.startswith("n_")
    assert first != request_id("n", "key2", "order-1") != request_id("n", "key1", "order-2")
    assert len(first) == 34


def test_the_fingerprint_ignores_key_order_only() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1, "b": [1, 2]}) != fingerprint({"a": 1, "b": [2, 1]})


def test_an_uploaded_audience() -> None:
    users, repeats = parse_audience("user_id\nu1\n\nu2\r\nu1\n u3 \n")
    assert users == ["u1", "u2", "u3"] and repeats == 1
    with pytest.raises(Rejected, match="line 2"):
        parse_audience("u1\n" + "x" * 200 + "\n")
    with pytest.raises(Rejected, match="no user id"):
        parse_audience("user_id\n\n")


def test_pacing_credit_holds_one_second_of_the_rate() -> None:
    assert refill(0.0, 100.0, 100.5, rate=10) == pytest.approx(5.0)
    assert refill(0.0, 100.0, 1000.0, rate=10) == 10.0
    assert refill(0.0, 100.0, 1000.0, rate=0.5) == 1.0  # at least one user
    assert refill(3.0, None, 0.0, rate=10) == 3.0


def test_a_campaign_takes_its_category_s_fallback_or_its_own() -> None:
    login, campaign = CATALOG.categories["login_code"], CATALOG.categories["campaign"]
    # The category's order, among the channels.
    assert resolve_fallback(login, None, None) == (("push", "sms"), ("push", "sms"))
    assert resolve_fallback(login, ["push", "inbox"], None) == (("push", "inbox"), ())
    assert resolve_fallback(campaign, None, None) == (("push", "inbox"), ())
    # Its own: its channels are on, in the order asked for.
    assert resolve_fallback(campaign, None, ["email", "push"]) == (
        ("push", "inbox", "email"),
        ("email", "push"),
    )
    assert resolve_fallback(campaign, ["push", "email"], ["push", "email"]) == (
        ("push", "email"),
        ("push", "email"),
    )


@pytest.mark.parametrize(
    ("channels", "fallback", "code", "fragment"),
    [
        (None, ["push"], "invalid_fallback", "two or more channels"),
        (None, ["push", "push"], "invalid_fallback", "each once"),
        (["push"], ["push", "email"], "invalid_fallback", "name them in channels too"),
        (None, ["push", "sms"], "channel_not_allowed", "not SMS-eligible"),
    ],
)
def test_a_bad_campaign_fallback_is_refused_with_a_reason(
    channels: list[str] | None, fallback: list[str], code: str, fragment: str
) -> None:
    with pytest.raises(Rejected) as caught:
        resolve_fallback(CATALOG.categories["campaign"], channels, fallback)  # type: ignore[arg-type]
    assert caught.value.code == code and fragment in caught.value.message
