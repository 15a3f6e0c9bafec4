"""Channel addresses and their contracts: validation, codecs, topics, old events still valid."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from operators.delivery.model import ProviderAnswer, Verdict, classify
from schemas.addresses import (
    DEVICE_PROVIDERS,
    InvalidAddress,
    check_email,
    check_phone,
    check_subscription,
    check_url,
    subscription_parts,
)
from schemas.codecs import (
    InvalidEvent,
    decode_device_change,
    decode_dispatch_batch,
    decode_preference_change,
    decode_preference_event,
    decode_retry_record,
    encode_category_switch,
    encode_device_change,
    encode_dispatch_batch,
    encode_retry_record,
)
from schemas.records import (
    CategorySwitch,
    ChannelMessage,
    DeviceChange,
    DispatchBatch,
    DispatchItem,
    RetryRecord,
)
from schemas.topics import ALL_TOPICS, CHANNEL_TIER_TOPICS, channel_tier_topic

TS = "2026-12-06T10:00:00Z"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def subscription(endpoint: str = "https://push.example.net/wpush/v2/abc") -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return json.dumps(
        {
            "endpoint": endpoint,
            "expirationTime": None,
            "keys": {"p256dh": b64(point), "auth": b64(b"0123456789abcdef")},
        }
    )


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("ada@example.com", "ada@example.com"),
        ("Ada.Lovelace+news@Example.COM", "Ada.Lovelace+news@example.com"),
        ("o'brien@sub.example.co.uk", "o'brien@sub.example.co.uk"),
        ("user@bücher.de", "user@xn--bcher-kva.de"),
    ],
)
def test_valid_emails_are_normalized_on_the_domain_only(given: str, expected: str) -> None:
    assert check_email(given) == expected


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("ada", "local@domain"),
        ("@example.com", "local@domain"),
        ("ada@", "no domain"),
        ("ada@localhost", "valid domain"),
        ("ada@example", "valid domain"),
        ("ada@192.168.1.1", "IP address"),
        ("ada@[10.0.0.1]", "address literals"),
        ('"ada lovelace"@example.com', "spaces"),
        ('"ada"@example.com', "quoted"),
        ("ada..l@example.com", "local part"),
        (".ada@example.com", "local part"),
        ("ada@exa_mple.com", "valid domain"),
        ("ada@-example.com", "valid domain"),
        ("adä@example.com", "ASCII"),
        ("ada@example.com\n", "spaces"),
        ("a" * 65 + "@example.com", "64"),
        ("a@" + "b" * 250 + ".com", "254"),
    ],
)
def test_malformed_emails_say_why(given: str, reason: str) -> None:
    with pytest.raises(InvalidAddress, match=reason):
        check_email(given)


@pytest.mark.parametrize("number", ["+14155550123", "+447911123456", "+6834002"])
def test_e164_numbers(number: str) -> None:
    assert check_phone(number) == number


@pytest.mark.parametrize(
    "number",
    [
        "14155550123",
        "+1 415 555 0123",
        "+0123456789",
        "+12345",
        "+1234567890123456",
        "+1-415-555-0123",
        "+14155550123\n",
    ],
)
def test_numbers_that_are_not_e164(number: str) -> None:
    with pytest.raises(InvalidAddress, match=r"E\.164"):
        check_phone(number)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://hooks.slack.com/services/T/B/X", "https"),
        ("ftp://hooks.slack.com/x", "https://"),
        ("https://127.0.0.1/hook", "loopback, private"),
        ("https://10.1.2.3/hook", "loopback, private"),
        ("https://169.254.169.254/latest/meta-data", "loopback, private"),
        ("https://[::1]/hook", "loopback, private"),
        ("https://[::ffff:10.0.0.1]/hook", "loopback, private"),
        ("https://localhost:8443/hook", "loopback, private"),
        ("https://db.internal/hook", "loopback, private"),
        ("https://user:pw@hooks.slack.com/x", "user name"),
        ("https://hooks.slack.com/x#frag", "fragment"),
        ("https:///x", "no host"),
        ("https://2130706433/x", "valid domain"),
        ("https://hooks.slack.com/a b", "no spaces"),
        ("https://" + "a" * 2050 + ".com/", "2048"),
    ],
)
def test_webhook_urls_outside_the_dev_stack(url: str, reason: str) -> None:
    with pytest.raises(InvalidAddress, match=reason):
        check_url(url, "a chat webhook URL")


def test_public_https_urls_pass_and_the_dev_setting_allows_local_ones() -> None:
    for url in (
        "https://hooks.slack.com/services/T0/B0/XYZ",
        "https://acme.webhook.office.com/webhookb2/x",
        "https://93.184.216.34/hook",
    ):
        assert check_url(url, "u") == url
    for url in (
        "http://127.0.0.1:8123/services/T/B/X",
        "https://localhost:9443/x",
        "http://10.0.0.5/h",
    ):
        assert check_url(url, "u", allow_dev=True) == url
        with pytest.raises(InvalidAddress):
            check_url(url, "u")


def test_subscriptions_are_checked_and_made_canonical() -> None:
    token = subscription()
    canonical = check_subscription(token)
    assert json.loads(canonical).keys() == {"endpoint", "keys"}  # expirationTime dropped
    assert check_subscription(canonical) == canonical
    endpoint, p256dh, auth = subscription_parts(canonical)
    assert endpoint.startswith("https://push.example.net/")
    assert (
        len(base64.urlsafe_b64decode(p256dh + "==")) == 65
        and len(base64.urlsafe_b64decode(auth + "==")) == 16
    )


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("keys"), "keys"),
        (lambda d: d["keys"].pop("auth"), "keys"),
        (lambda d: d["keys"].update(auth=b64(b"short")), "16 bytes"),
        (lambda d: d["keys"].update(p256dh=b64(b"\x04" + b"x" * 10)), "65 bytes"),
        (lambda d: d["keys"].update(p256dh=b64(b"\x02" + b"x" * 64)), "uncompressed"),
        (lambda d: d["keys"].update(auth="!!not base64!!"), "base64url"),
        (lambda d: d.update(endpoint="http://push.example.net/x"), "https"),
        (lambda d: d.update(endpoint="https://192.168.0.4/x"), "private"),
        (lambda d: d.update(extra=1), "no fields"),
        (lambda d: d.pop("endpoint"), "endpoint"),
    ],
)
def test_malformed_subscriptions_say_why(mutate: object, reason: str) -> None:
    doc = json.loads(subscription())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(InvalidAddress, match=reason):
        check_subscription(json.dumps(doc))


# --- device_changes ---------------------------------------------------------------------------


def device(provider: str, token: str | None, active: bool = True, **extra: object) -> bytes:
    body: dict[str, object] = {
        "user_id": "u1",
        "device_id": "d1",
        "provider": provider,
        "active": active,
        "ts": TS,
        **extra,
    }
    if token is not None:
        body["token"] = token
    return orjson.dumps(body)


def test_existing_push_device_events_decode_as_before() -> None:
    change = decode_device_change(device("apns", "ab" * 32))
    assert change.provider == "apns" and change.token == "ab" * 32
    assert decode_device_change(device("fcm", None, active=False)).active is False


@pytest.mark.parametrize("provider", ["email", "sms", "chat", "webpush"])
def test_channel_addresses_are_a_dead_letter_for_push_only_consumers(provider: str) -> None:
    tokens = {
        "email": "a@example.com",
        "sms": "+14155550123",
        "chat": "https://hooks.slack.com/services/T/B/X",
        "webpush": subscription(),
    }
    with pytest.raises(InvalidEvent) as caught:
        decode_device_change(device(provider, tokens[provider]))
    assert caught.value.kind == "unsupported_provider"
    change = decode_device_change(device(provider, tokens[provider]), providers=DEVICE_PROVIDERS)
    assert change.provider == provider


@pytest.mark.parametrize(
    ("provider", "token", "kind"),
    [
        ("email", "not-an-address", "schema"),
        ("email", "a@localhost", "invalid_address"),
        ("sms", "4155550123", "schema"),
        ("sms", "+1 415 555 0123", "schema"),
        ("chat", "ftp://x.example.com", "schema"),
        ("chat", "http://hooks.slack.com/services/x", "invalid_address"),
        ("chat", "https://10.0.0.1/hook", "invalid_address"),
        ("webpush", '{"endpoint": "https://push.example.net/x"}', "invalid_address"),
        ("webpush", "https://push.example.net/x", "schema"),
        ("inapp", "u1", "schema"),
    ],
)
def test_malformed_addresses_are_refused_with_a_reason(
    provider: str, token: str, kind: str
) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_device_change(device(provider, token), providers=DEVICE_PROVIDERS)
    assert caught.value.kind == kind, caught.value


def test_the_dev_setting_allows_local_webhooks_and_addresses_come_back_canonical() -> None:
    local = "http://127.0.0.1:9000/services/T/B/X"
    with pytest.raises(InvalidEvent):
        decode_device_change(device("chat", local), providers=DEVICE_PROVIDERS)
    change = decode_device_change(
        device("chat", local), providers=DEVICE_PROVIDERS, allow_dev_addresses=True
    )
    assert change.token == local
    email = decode_device_change(device("email", "Ada@Example.COM"), providers=DEVICE_PROVIDERS)
    assert email.token == "Ada@example.com"
    raw = encode_device_change(
        DeviceChange("u1", "w1", "webpush", subscription(), True, datetime.now(UTC))
    )
    web = decode_device_change(raw, providers=DEVICE_PROVIDERS)
    assert web.token is not None and "expirationTime" not in web.token


# --- preference_changes ------------------------------------------------------------------------


def test_a_category_switch_round_trips_and_old_decoders_dead_letter_it() -> None:
    switch = CategorySwitch(
        "u1", "campaign", None, False, datetime(2026, 12, 6, tzinfo=UTC), "unsubscribe_link"
    )
    raw = encode_category_switch(switch)
    assert decode_preference_event(raw) == switch
    with pytest.raises(InvalidEvent) as caught:
        decode_preference_change(raw)
    assert caught.value.kind == "unsupported_kind"
    complete = orjson.dumps({"user_id": "u1", "timezone": "Europe/Paris", "ts": TS})
    assert decode_preference_change(complete) == decode_preference_event(complete)


@pytest.mark.parametrize(
    "mutation",
    [
        {"kind": "category_toggle"},
        {"category": "Bad Name"},
        {"channel": "fax"},
        {"enabled": "no"},
        {"timezone": "UTC"},
        {"source": "someone"},
    ],
)
def test_malformed_category_switches_are_schema_errors(mutation: dict[str, object]) -> None:
    body = {
        "kind": "category_switch",
        "user_id": "u1",
        "category": "campaign",
        "channel": "email",
        "enabled": False,
        "ts": TS,
        **mutation,
    }
    with pytest.raises(InvalidEvent) as caught:
        decode_preference_event(orjson.dumps(body))
    assert caught.value.kind == "schema"


# --- dispatch batches and retries carry the message and the locale -----------------------------


MESSAGE = ChannelMessage(
    category="receipt",
    template_id="receipt",
    tier="transactional",
    data={"order_id": "1", "amount": "9.90", "currency": "EUR"},
)


def test_a_channel_batch_round_trips_with_its_message_and_goes_to_its_tier_topic() -> None:
    item = DispatchItem(
        notification_id="n1:u1", user_id="u1", device_id="e1", token="a@example.com", locale="fr-CA"
    )
    batch = DispatchBatch("n1", "api:k1", "email", TS, "normal", (item,), MESSAGE)
    assert batch.topic == "email.transactional" == channel_tier_topic("email", "transactional")
    back = decode_dispatch_batch(encode_dispatch_batch(batch), "normal")
    assert back == batch
    post = DispatchBatch(
        "p1",
        "a1",
        "inapp",
        TS,
        "normal",
        ({"notification_id": "p1:u1", "user_id": "u1", "device_id": "inapp", "token": "u1"},),
    )
    assert post.topic == "inapp.social"
    assert b"message" not in encode_dispatch_batch(post)
    push = DispatchBatch(
        "p1",
        "a1",
        "fcm",
        TS,
        "bulk",
        ({"notification_id": "p1:u1", "user_id": "u1", "device_id": "d", "token": "t" * 40},),
    )
    assert push.topic == "push.fcm.bulk"


def test_retry_records_keep_the_message_and_push_retries_stay_as_they_were() -> None:
    item = DispatchItem(
        notification_id="n1:u1", user_id="u1", device_id="e1", token="a@example.com", locale="de"
    )
    record = RetryRecord("email", "normal", "n1", "api:k1", TS, item, 1, 1, 1.0e9, "451", MESSAGE)
    assert decode_retry_record(encode_retry_record(record)) == record
    push = RetryRecord(
        "apns",
        "normal",
        "p1",
        "a1",
        TS,
        {"notification_id": "p1:u1", "user_id": "u1", "device_id": "d", "token": "ab" * 32},
        1,
        1,
        1.0e9,
        "429",
    )
    raw = encode_retry_record(push)
    assert b"message" not in raw and decode_retry_record(raw) == push


def test_channel_topics_are_in_the_contract() -> None:
    assert len(CHANNEL_TIER_TOPICS) == 15
    assert set(CHANNEL_TIER_TOPICS) <= set(ALL_TOPICS)
    assert "email.transactional" in CHANNEL_TIER_TOPICS and "inapp.marketing" in CHANNEL_TIER_TOPICS


# --- answers become outcomes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "answer", "verdict"),
    [
        ("email", ProviderAnswer(250, None), Verdict.ACCEPTED),
        ("email", ProviderAnswer(550, "RCPT 5.1.1 no such user"), Verdict.INVALID_TOKEN),
        ("email", ProviderAnswer(553, "RCPT 5.1.3 bad address"), Verdict.INVALID_TOKEN),
        ("email", ProviderAnswer(552, "RCPT 5.2.2 mailbox full"), Verdict.TRANSIENT),
        ("email", ProviderAnswer(451, "RCPT 4.7.1 greylisted"), Verdict.TRANSIENT),
        ("email", ProviderAnswer(421, "MAIL 4.3.2 shutting down"), Verdict.TRANSIENT),
        ("email", ProviderAnswer(554, "DATA 5.6.0 content rejected"), Verdict.PERMANENT),
        ("email", ProviderAnswer(535, "AUTH 5.7.8 bad credentials"), Verdict.TRANSIENT),
        ("email", ProviderAnswer(None, "timeout"), Verdict.TRANSIENT),
        ("email", ProviderAnswer(None, "held: domain example.com", 2.0), Verdict.HELD),
        ("sms", ProviderAnswer(201, None), Verdict.ACCEPTED),
        ("sms", ProviderAnswer(400, "21610"), Verdict.INVALID_TOKEN),
        ("sms", ProviderAnswer(400, "21211"), Verdict.INVALID_TOKEN),
        ("sms", ProviderAnswer(429, "20429", 3.0), Verdict.TRANSIENT),
        ("sms", ProviderAnswer(503, None), Verdict.TRANSIENT),
        ("sms", ProviderAnswer(401, "20003"), Verdict.TRANSIENT),
        ("sms", ProviderAnswer(402, "sms_budget_user"), Verdict.PERMANENT),
        ("sms", ProviderAnswer(403, "category_not_sms_eligible"), Verdict.PERMANENT),
        ("sms", ProviderAnswer(400, "21602"), Verdict.PERMANENT),
        ("webpush", ProviderAnswer(201, None), Verdict.ACCEPTED),
        ("webpush", ProviderAnswer(410, None), Verdict.INVALID_TOKEN),
        ("webpush", ProviderAnswer(404, None), Verdict.INVALID_TOKEN),
        ("webpush", ProviderAnswer(429, None, 5.0), Verdict.TRANSIENT),
        ("webpush", ProviderAnswer(413, None), Verdict.PERMANENT),
        ("webpush", ProviderAnswer(403, None), Verdict.PERMANENT),
        ("chat", ProviderAnswer(200, None), Verdict.ACCEPTED),
        ("chat", ProviderAnswer(404, "no_service"), Verdict.INVALID_TOKEN),
        ("chat", ProviderAnswer(410, "channel_is_archived"), Verdict.INVALID_TOKEN),
        ("chat", ProviderAnswer(403, "invalid_token"), Verdict.INVALID_TOKEN),
        ("chat", ProviderAnswer(403, "action_prohibited"), Verdict.PERMANENT),
        ("chat", ProviderAnswer(429, "rate_limited", 1.0), Verdict.TRANSIENT),
        ("chat", ProviderAnswer(400, "invalid_payload"), Verdict.PERMANENT),
        ("inapp", ProviderAnswer(200, None), Verdict.ACCEPTED),
        ("inapp", ProviderAnswer(None, "redis: ConnectionError"), Verdict.TRANSIENT),
        ("apns", ProviderAnswer(410, "Unregistered"), Verdict.INVALID_TOKEN),
        ("fcm", ProviderAnswer(404, "UNREGISTERED"), Verdict.INVALID_TOKEN),
    ],
)
def test_channel_answers_are_classified(
    provider: str, answer: ProviderAnswer, verdict: Verdict
) -> None:
    assert classify(provider, answer) is verdict  # type: ignore[arg-type]
