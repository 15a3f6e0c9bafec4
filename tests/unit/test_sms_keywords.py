"""Inbound SMS keywords and the TwiML answers (operators/notify/sms_keywords.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from operators.notify.sms_keywords import REPLIES, parse_keyword, twiml


@pytest.mark.parametrize(
    ("body", "keyword"),
    [
        ("STOP", "stop"),
        ("stop", "stop"),
        ("  Stop.  ", "stop"),
        ("StopAll", "stop"),
        ("unsubscribe!", "stop"),
        ("CANCEL", "stop"),
        ("end", "stop"),
        ("Quit", "stop"),
        ("START", "start"),
        ("unstop", "start"),
        ("Yes", "start"),
        ("help", "help"),
        ("INFO", "help"),
        ("stop please", None),
        ("please stop", None),
        ("STOPP", None),
        ("", None),
        ("thanks!", None),
        ("S T O P", None),
    ],
)
def test_only_a_message_that_is_a_keyword_is_one(body: str, keyword: str | None) -> None:
    assert parse_keyword(body) == keyword


def test_twiml_sends_the_reply_back_escaped_or_nothing() -> None:
    root = ET.fromstring(twiml("Reply <STOP> & be done"))
    assert root.tag == "Response"
    [message] = list(root)
    assert (message.tag, message.text) == ("Message", "Reply <STOP> & be done")
    assert list(ET.fromstring(twiml(None))) == []
    for reply in REPLIES.values():
        assert ET.fromstring(twiml(reply))[0].text == reply
