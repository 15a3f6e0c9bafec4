"""Pushes of API notifications: rendered from the template in the user's locale, kept under the
providers' 4096 bytes, collapsed by the notification's collapse_key on every payload builder."""

from __future__ import annotations

import dataclasses
import json

import orjson
import pytest

from operators.adapters.catalog_files import load_catalog
from operators.adapters.providers.push_texts import TemplatePushRenderer
from operators.delivery.model import SendRequest
from operators.delivery.payloads import (
    MAX_PAYLOAD_BYTES,
    PayloadTooLarge,
    PushTemplate,
    UnrenderablePush,
    apns_body,
    apns_payload,
    fcm_body,
    fcm_content,
    push_collapse_id,
)
from operators.notify.templates import ELLIPSIS
from schemas.records import ChannelMessage
from tests.fakes import request

CATALOG = load_catalog()  # the shipped categories and templates
RENDERER = TemplatePushRenderer(PushTemplate(), CATALOG.templates)


def login(code: str = "482913", collapse_key: str | None = None) -> ChannelMessage:
    message = ChannelMessage(
        category="login_code",
        template_id="login_code",
        tier="transactional",
        data={"code": code, "minutes": 10},
    )
    if collapse_key is not None:
        message["collapse_key"] = collapse_key
    return message


def notification(
    message: ChannelMessage | None, locale: str | None = None, provider: str = "apns"
) -> SendRequest:
    r = request("u1", "d1", post="n_7f3a", provider=provider)
    item = dict(r.item)
    if locale is not None:
        item["locale"] = locale
    return dataclasses.replace(r, item=item, message=message)  # type: ignore[arg-type]


def apns_alert(body: bytes) -> dict[str, str]:
    alert: dict[str, str] = orjson.loads(body)["aps"]["alert"]
    return alert


def test_the_push_is_rendered_in_the_user_s_locale_with_fallback() -> None:
    fr = apns_alert(apns_body(RENDERER, notification(login(), "fr-CA")))  # fr-CA -> fr
    assert fr["title"] == "Votre code de connexion" and "482913" in fr["body"]
    de = apns_alert(apns_body(RENDERER, notification(login(), "de")))
    assert de["title"] == "Ihr Anmeldecode"
    en = apns_alert(apns_body(RENDERER, notification(login(), "pt-BR")))  # none: the default
    assert en["title"] == "Your login code"
    assert apns_alert(apns_body(RENDERER, notification(login())))["title"] == "Your login code"
    payload = apns_payload(RENDERER, notification(login(), "fr"))
    assert payload["notification_id"] == "n_7f3a:u1" and payload["category"] == "login_code"
    content = fcm_content(RENDERER, notification(login(), "fr", provider="fcm"))
    assert content.title == "Votre code de connexion" and content.data["device_id"] == "d1"


def test_a_post_without_a_message_is_rendered_as_before() -> None:
    post = request("u1", "d1", post="p9")
    assert apns_body(RENDERER, post) == apns_body(PushTemplate(), post)
    assert push_collapse_id(post) == "p9"


def test_a_long_body_is_shortened_to_fit_4096_bytes_on_every_builder() -> None:
    r = notification(login(code="x" * 6_000), "en")
    body = apns_body(RENDERER, r)
    alert = apns_alert(body)
    assert len(body) <= MAX_PAYLOAD_BYTES and alert["title"] == "Your login code"
    assert alert["body"].endswith(ELLIPSIS) and alert["body"].startswith("xxxx")
    assert len(json.dumps(apns_payload(RENDERER, r), ensure_ascii=False).encode()) <= 4096
    content = fcm_content(RENDERER, r)
    measured = orjson.dumps(
        {
            "notification": {"title": content.title, "body": content.body},
            "data": content.data,
            "android": {"collapse_key": content.collapse_key},
        }
    )
    assert len(measured) <= MAX_PAYLOAD_BYTES and content.body.endswith(ELLIPSIS)
    # Nearly all of the room is used: the body was cut, not dropped.
    assert len(body) > MAX_PAYLOAD_BYTES - 200


def test_the_collapse_key_is_the_apns_collapse_id_and_fcm_s_collapse_key() -> None:
    r = notification(login(collapse_key="login:u1"), provider="fcm")
    assert push_collapse_id(r) == "login:u1"
    message = orjson.loads(fcm_body(RENDERER, r, 60))["message"]
    assert message["android"]["collapse_key"] == "login:u1"
    # None given: the notification's own id (a resend replaces, never duplicates).
    assert push_collapse_id(notification(login())) == "n_7f3a"
    long_key = "summary:" + "é" * 60  # 128 bytes: over APNs' 64
    collapsed = push_collapse_id(notification(login(collapse_key=long_key)))
    assert len(collapsed.encode()) <= 64
    assert collapsed == push_collapse_id(notification(login(collapse_key=long_key)))


def test_an_unknown_template_or_bad_data_is_refused_before_sending() -> None:
    gone = login()
    gone["template_id"] = "no_such_template"
    with pytest.raises(UnrenderablePush, match="not in the catalog"):
        apns_body(RENDERER, notification(gone))
    missing = login()
    missing["data"] = {"code": "1"}  # no `minutes`
    with pytest.raises(UnrenderablePush, match="minutes"):
        fcm_body(RENDERER, notification(missing), 60)
    # The engine records PayloadTooLarge as failed + a dead letter, never sent nor retried.
    assert issubclass(UnrenderablePush, PayloadTooLarge)
    # A sender without the catalog cannot render a notification, and says so.
    with pytest.raises(UnrenderablePush, match="no template catalog"):
        apns_body(PushTemplate(), notification(login()))


def test_texts_are_rendered_once_per_notification_locale_and_data() -> None:
    renderer = TemplatePushRenderer(PushTemplate(), CATALOG.templates)
    first = apns_alert(apns_body(renderer, notification(login("111111"), "fr")))
    # Same notification id, other data (a caller reusing an id): rendered again, not reused.
    other = apns_alert(apns_body(renderer, notification(login("222222"), "fr")))
    german = apns_alert(apns_body(renderer, notification(login("111111"), "de")))
    assert "111111" in first["body"] and "222222" in other["body"]
    assert german["title"] == "Ihr Anmeldecode" and first["title"] == "Votre code de connexion"


def test_texts_under_the_sure_fit_bound_fit_even_when_every_byte_is_escaped() -> None:
    from operators.adapters.providers.push_texts import SURE_FIT_BYTES

    r = notification(login(), "en")
    title, body, data = RENDERER.texts(r)
    room = SURE_FIT_BYTES - sum(len(t.encode()) for t in (title, body, *data.values()))
    # \x01 is written as \u0001 in JSON: six bytes for one.
    escaped = notification(login(code="\x01" * (room + len("482913"))), "en")
    for build in (lambda: apns_body(RENDERER, escaped), lambda: fcm_body(RENDERER, escaped, 60)):
        assert len(build()) <= MAX_PAYLOAD_BYTES + 200  # fcm_body adds the token and ttl
    assert ELLIPSIS not in apns_alert(apns_body(RENDERER, escaped))["body"]  # not shortened
    assert len(json.dumps(apns_payload(RENDERER, escaped), ensure_ascii=False).encode()) <= 4096
