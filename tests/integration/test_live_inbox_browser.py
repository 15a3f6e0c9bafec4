"""The live inbox in a real headless Chromium: the dev page, the bell, SSE from the in-app channel.

The page (`/dev/inbox?user=ID` on `fanfare api` in FANFARE_DEV_MODE) opens an EventSource on the
user's live stream with a stream token; the test publishes in-app notifications through the
in-app sender (as a delivery worker does) and reads the page's DOM through the DevTools
protocol. Skipped, with the reason, only when no Chromium is installed (`.ci/run` installs it).
"""

from __future__ import annotations

import time
import uuid

import pytest

from schemas.records import ChannelMessage
from scripts.dev.browser import HeadlessChromium, chromium_binary
from tests.integration.channel_stack import ChannelStack, channel_request, channel_stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        chromium_binary() is None,
        reason="no chromium on PATH: apt-get install chromium (.ci/run installs it)",
    ),
]
__all__ = ["channel_stack"]

RECEIPT = ChannelMessage(
    category="receipt",
    template_id="receipt",
    tier="transactional",
    data={"order_id": "4242", "amount": "12.00", "currency": "EUR"},
)
LOGIN = ChannelMessage(
    category="login_code",
    template_id="login_code",
    tier="transactional",
    data={"code": "777111", "minutes": 5},
)


def test_the_bell_and_the_inbox_update_live_in_a_real_browser(channel_stack: ChannelStack) -> None:
    s = channel_stack
    user = f"web-{uuid.uuid4().hex[:6]}"
    # One notification before the page opens: the page shows what the stream kept (since=0).
    s.send("inapp", channel_request("inapp", user, user, RECEIPT, device="inapp"))
    with HeadlessChromium() as browser:
        browser.navigate(f"{s.base}/dev/inbox?user={user}")
        browser.wait_for("document.body.dataset.live === 'ready'", 30)
        assert browser.wait_for("document.querySelectorAll('#inbox li').length", 10) == 1
        assert (
            browser.evaluate("document.querySelector('#inbox li b').textContent")
            == "Receipt for order 4242"
        )
        published = time.time()
        [answer] = s.send("inapp", channel_request("inapp", user, user, LOGIN, device="inapp"))
        assert answer.status == 200
        browser.wait_for("document.querySelectorAll('#inbox li').length === 2", 10)
        newest = browser.evaluate("document.querySelector('#inbox li b').textContent")
        received_ms = browser.evaluate(
            "Number(document.querySelector('#inbox li').dataset.received)"
        )
        assert newest == "Your login code"
        assert browser.evaluate("document.querySelector('#count').textContent") == "2"
        assert received_ms / 1000 - published < 2.0  # publish to the browser's DOM
        browser.evaluate("document.getElementById('bell').click()")
        assert browser.evaluate("document.querySelector('#count').dataset.n") == "0"
