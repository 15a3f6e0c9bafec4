"""The channels' pure parts: signed links, device bodies, SMS text, pacing, chat formats."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from operators.adapters.catalog_files import load_catalog
from operators.adapters.channels.chat import is_teams, slack_body, teams_body
from operators.adapters.channels.content import ChannelRenderer, Content, Unrenderable
from operators.adapters.channels.pacing import KeyedPacer
from operators.adapters.channels.sms import segments, sms_text
from operators.adapters.http.channels import _one_click, twilio_signature
from operators.adapters.http.devices import device_registration
from operators.adapters.http.models import DeviceIn
from operators.adapters.redis.live import stream_id_key
from operators.adapters.redis.rate_limiter import AsyncLocalRateLimiter, LocalRateLimiter
from operators.delivery.model import Verdict, classify
from operators.delivery.payloads import PushTemplate
from operators.notify.links import (
    InvalidLink,
    read_stream_token,
    read_unsubscribe,
    stream_token,
    unsubscribe_token,
)
from operators.notify.requests import Rejected
from schemas.records import ChannelMessage
from scripts.dev.local_channels.sms import twilio_signature as server_signature
from tests.fakes import request

SECRET = b"k" * 32
NOW = 1_780_000_000.0


# --- signed links -----------------------------------------------------------------------------


def test_an_unsubscribe_token_names_its_user_and_category() -> None:
    token = unsubscribe_token(SECRET, "u42", "campaign", NOW)
    found = read_unsubscribe(SECRET, token, NOW + 86_400, ttl_s=30 * 86_400)
    assert (found.user_id, found.category) == ("u42", "campaign")
    assert token.isascii() and "/" not in token and "+" not in token  # safe in a URL path


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), "invalid_token"),  # the tag
        (lambda t: "e30" + t[t.index(".") :], "invalid_token"),  # another payload, same tag
        (lambda t: t.replace(".", ""), "invalid_token"),
        (lambda t: t + ".x", "invalid_token"),
        (lambda t: "x" * 2000, "invalid_token"),
    ],
)
def test_altered_tokens_are_refused(mutate: object, code: str) -> None:
    token = unsubscribe_token(SECRET, "u42", "campaign", NOW)
    with pytest.raises(InvalidLink) as caught:
        read_unsubscribe(SECRET, mutate(token), NOW, ttl_s=86_400)  # type: ignore[operator]
    assert caught.value.code == code


def test_tokens_expire_need_the_key_and_serve_one_purpose() -> None:
    token = unsubscribe_token(SECRET, "u42", "campaign", NOW)
    with pytest.raises(InvalidLink) as caught:
        read_unsubscribe(SECRET, token, NOW + 91, ttl_s=90)
    assert caught.value.code == "expired_token"
    with pytest.raises(InvalidLink):
        read_unsubscribe(b"other" * 8, token, NOW, ttl_s=90)
    with pytest.raises(InvalidLink):  # an unsubscribe token is not a stream token
        read_stream_token(SECRET, token, NOW, ttl_s=90)
    stream = stream_token(SECRET, "u42", NOW)
    assert read_stream_token(SECRET, stream, NOW, ttl_s=60) == "u42"
    with pytest.raises(InvalidLink):
        read_unsubscribe(SECRET, stream, NOW, ttl_s=60)


# --- device bodies ----------------------------------------------------------------------------


def register(allow_dev: bool, **body: object) -> tuple[str, str | None]:
    change, _ = device_registration(
        "u1", DeviceIn.model_validate(body), datetime.now(UTC), allow_dev
    )
    return change.device_id, change.token


@pytest.mark.parametrize(
    "address",
    [
        "http://hooks.example.com/x",
        "https://127.0.0.1/x",
        "https://10.0.0.8/hook",
        "https://localhost/x",
        "https://metadata.internal/x",
    ],
)
def test_private_and_plain_http_webhooks_are_refused_outside_the_dev_stack(address: str) -> None:
    with pytest.raises(Rejected) as caught:
        register(False, provider="chat", address=address)
    assert (caught.value.code, caught.value.field) == ("invalid_address", "address")
    assert register(True, provider="chat", address=address)[1] == address


def test_channel_device_ids_come_from_the_canonical_address() -> None:
    first = register(False, provider="email", address="Ada@Example.com")
    second = register(False, provider="email", address="Ada@example.COM")
    assert first == second and first[0].startswith("email-")
    assert register(False, provider="email", address="ada@example.com", device_id="work") == (
        "work",
        "ada@example.com",
    )


# --- SMS --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("é" * 160, 1),
        ("€" * 80, 1),
        ("€" * 81, 2),
        ("ж" * 70, 1),
        ("ж" * 71, 2),
        ("😀" * 35, 1),
        ("😀" * 36, 2),
    ],
)
def test_sms_segments_follow_gsm7_and_ucs2(text: str, count: int) -> None:
    assert segments(text) == count


def test_sms_text_keeps_web_links_and_fits_1600_characters() -> None:
    assert sms_text("Code", "123456", "fanfare://login") == "Code\n123456"
    assert sms_text("Sale", "Now", "https://x.example/s") == "Sale\nNow\nhttps://x.example/s"
    long = sms_text("T", "b" * 5000, None)
    assert len(long) == 1600 and long.endswith("…")


def test_the_server_and_the_api_agree_on_twilio_signatures() -> None:
    params = {"MessageStatus": "delivered", "MessageSid": "SM1", "To": "+14155550123"}
    url = "https://api.example.com/v1/callbacks/sms?n=a%3Ab&d=d1&u=u1"
    assert twilio_signature("tok", url, params) == server_signature("tok", url, params)
    assert twilio_signature("tok", url, params) != twilio_signature("tok", url + "x", params)


# --- pacing, content, chat formats, one-click bodies ------------------------------------------


def test_a_bucket_per_key_holds_the_excess_with_a_wait() -> None:
    clock = [time.monotonic()]
    limiter = AsyncLocalRateLimiter(LocalRateLimiter(clock=lambda: clock[0]))
    pacer = KeyedPacer("email", limiter, 60, lambda r: r.item["token"].split("@")[1], "domain")
    reqs = [request(f"u{i}", token=f"u{i}@a.example", provider="email") for i in range(3)]
    reqs.append(request("v", token="v@b.example", provider="email"))
    held = asyncio.run(pacer.admit(reqs))
    assert sorted(held) == [1, 2]
    assert all(classify("email", a) is Verdict.HELD for a in held.values())
    assert held[1].retry_after_s is not None and held[2].retry_after_s is not None
    assert 0.5 <= held[1].retry_after_s < held[2].retry_after_s
    clock[0] += 2.0
    assert (
        asyncio.run(pacer.admit(reqs[:1])) == {}
    )  # a token again (the bucket holds one: 60/min, 1 s burst)


def test_content_from_the_template_or_the_post() -> None:
    catalog = load_catalog("", "")
    renderer = ChannelRenderer(catalog, PushTemplate())
    message = ChannelMessage(
        category="receipt",
        template_id="receipt",
        tier="transactional",
        data={"order_id": "1", "amount": "2", "currency": "EUR"},
    )
    r = request("u1", provider="email")
    assert renderer.content(r).category == "new_post"  # no message: a post
    with_message = type(r)(**{**{f: getattr(r, f) for f in r.__slots__}, "message": message})  # type: ignore[attr-defined]
    content = renderer.content(with_message)
    assert (content.title, content.tier) == ("Receipt for order 1", "transactional")
    assert renderer.sms_eligible(with_message) is False
    gone = type(r)(
        **{
            **{f: getattr(r, f) for f in r.__slots__},
            "message": {**message, "template_id": "deleted"},
        }
    )  # type: ignore[attr-defined]
    with pytest.raises(Unrenderable):
        renderer.content(gone)


def test_chat_formats_and_escaping() -> None:
    content = Content(
        "n1:u1",
        "u1",
        "receipt",
        "transactional",
        "A <b> & c",
        "line",
        "https://x.example",
        None,
        "n1",
    )
    assert (
        slack_body(content)["blocks"][0]["text"]["text"]
        == "*A &lt;b&gt; &amp; c*\nline\n<https://x.example|Open>"
    )
    assert teams_body(content)["potentialAction"][0]["targets"][0]["uri"] == "https://x.example"
    assert is_teams("https://acme.webhook.office.com/webhookb2/abc") and not is_teams(
        "https://hooks.slack.com/services/x"
    )


def test_one_click_bodies_and_stream_ids() -> None:
    assert _one_click("application/x-www-form-urlencoded", b"List-Unsubscribe=One-Click")
    assert not _one_click("application/x-www-form-urlencoded", b"List-Unsubscribe=Yes")
    multipart = b'--b\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click\r\n--b--\r\n'
    assert _one_click("multipart/form-data; boundary=b", multipart)
    assert (
        stream_id_key("1700000000000-2") > stream_id_key("1700000000000-1") > stream_id_key("9-9")
    )
    assert stream_id_key("x") == (-1, -1)
