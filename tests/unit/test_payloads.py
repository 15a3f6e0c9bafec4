from __future__ import annotations

import dataclasses
import json

import pytest

from operators.adapters.catalog_files import load_catalog
from operators.adapters.providers.push_texts import TemplatePushRenderer
from operators.delivery.payloads import (
    PayloadTooLarge,
    PushTemplate,
    apns_payload,
    collapse_id,
    fcm_body,
    fcm_content,
    push_collapse_id,
)
from schemas.records import ChannelMessage
from tests.fakes import request


def test_apns_payload_is_rendered_from_the_compact_item() -> None:
    payload = apns_payload(PushTemplate(), request("u1", "d1", post="p9"))
    assert payload["aps"]["alert"] == {"title": "a1 posted", "body": "Tap to read the new post"}
    assert payload["link"] == "fanfare://posts/p9"
    assert payload["notification_id"] == "p9:u1" and payload["device_id"] == "d1"


def test_fcm_content_has_a_collapse_key_per_post() -> None:
    content = fcm_content(PushTemplate(title="New from {author_id}"), request(post="p9"))
    assert content.title == "New from a1" and content.collapse_key == "p9"
    assert content.data["link"] == "fanfare://posts/p9"


def test_a_message_s_collapse_key_replaces_the_post_s() -> None:
    message = ChannelMessage(
        category="new_post",
        template_id="new_posts_bundle",
        tier="social",
        data={"count": 3, "names": "ana, ben", "others": 1, "author_ids": "ana,ben,cy"},
        collapse_key="bundle:new_post:u1",
    )
    summary = dataclasses.replace(request(post="bundle:new_post:1780315200"), message=message)
    assert push_collapse_id(summary) == "bundle:new_post:u1"
    # A notification's push is rendered from the shipped catalog's template.
    renderer = TemplatePushRenderer(PushTemplate(), load_catalog().templates)
    content = fcm_content(renderer, summary)
    assert content.collapse_key == "bundle:new_post:u1"
    assert content.title == "ana, ben and 1 other posted"
    body = json.loads(fcm_body(renderer, summary, 60))
    assert body["message"]["android"]["collapse_key"] == "bundle:new_post:u1"
    # Without a message, or a message without one: the post's, as before.
    assert push_collapse_id(request(post="p9")) == "p9"
    bare = ChannelMessage(category="receipt", template_id="receipt", tier="social", data={})
    assert push_collapse_id(dataclasses.replace(request(post="p9"), message=bare)) == "p9"
    # Bounded as APNs requires.
    long_key = dict(message, collapse_key="k" * 80)
    long = dataclasses.replace(summary, message=long_key)
    assert len(push_collapse_id(long).encode()) <= 64


def test_collapse_id_fits_apns_64_bytes() -> None:
    assert collapse_id("short") == "short"
    long_id = "é" * 40  # 80 bytes
    cid = collapse_id(long_id)
    assert len(cid.encode()) <= 64 and cid == collapse_id(long_id) and cid != collapse_id("é" * 41)


def test_payload_over_4096_bytes_is_refused_before_sending() -> None:
    big = PushTemplate(body="x" * 4_000 + "{post_id}")
    with pytest.raises(PayloadTooLarge, match="limit 4096"):
        apns_payload(big, request())
    with pytest.raises(PayloadTooLarge, match="limit 4096"):
        fcm_content(big, request())
    # Just under: measured as aioapns encodes it (non-ASCII kept as UTF-8 bytes).
    fits = PushTemplate(body="ü" * 1_900)
    size = len(json.dumps(apns_payload(fits, request()), ensure_ascii=False).encode())
    assert size <= 4096


def test_template_fields_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\{user\}"):
        PushTemplate(title="hi {user}")
