"""Chat webhooks (Slack- and Teams-compatible incoming webhooks), behind `PushSender`.

The address is the webhook URL (a secret: it is never logged, and its bucket is named by its
digest). The format follows the URL: Microsoft Teams (`*.webhook.office.com`, or a path with
`/webhookb2/`) gets a MessageCard (`@type`, `summary`, `title`, `text`, an `OpenUri` action);
everything else gets Slack's JSON (`text` as the fallback, one `section` block in mrkdwn),
which Mattermost, Rocket.Chat and Discord's `/slack` endpoints take too.

A webhook is paced by its own bucket (FANFARE_CHAT_WEBHOOK_RATE_PER_MIN, Slack allows about
one message a second) on top of the channel's; a send that finds it empty is HELD. Answers:
2xx accepted; 404 (`no_service`), 410 (`channel_is_archived`) and 403 `invalid_token` say the
webhook is gone (`invalid_token`: the engine deactivates it); 429 (Retry-After) and 5xx are
retried; other 4xx (`invalid_payload`, `action_prohibited`) fail. The guard refuses hosts that
resolve to non-public addresses (operators/adapters/channels/http.py); redirects are never
followed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from operators.adapters.channels.content import ChannelRenderer, Content
from operators.adapters.channels.http import HostGuard, HttpClient
from operators.adapters.channels.pacing import KeyedPacer, webhook_key
from operators.adapters.channels.ports import DestinationLimiter
from operators.delivery.model import ProviderAnswer, SendRequest
from operators.delivery.payloads import PayloadTooLarge
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec

MAX_BODY_BYTES = 40_000
"""Slack truncates `text` at 40,000 characters; Teams refuses cards over about 28 KB."""
_REASON = re.compile(r"^[a-z_]{3,64}$")


@dataclass(frozen=True, slots=True)
class ChatConfig:
    """Where to trust certificates from, whether local hosts are allowed, the per-webhook rate."""

    ca_file: Path | None
    allow_dev: bool
    webhook_rate_per_min: int


@dataclass(frozen=True, slots=True)
class RenderedPost:
    """A webhook post: where, and the JSON."""

    url: str
    body: bytes


def is_teams(url: str) -> bool:
    """Whether a webhook URL is a Microsoft Teams (Office 365 connector) one."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return host.endswith(".webhook.office.com") or "/webhookb2/" in parts.path


def _mrkdwn(text: str) -> str:
    """Slack's escaping: &, < and > only."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(content: Content) -> dict[str, Any]:
    """Slack's incoming-webhook JSON."""
    text = f"*{_mrkdwn(content.title)}*\n{_mrkdwn(content.body)}"
    link = content.link if content.link and content.link.startswith("https://") else None
    if link:
        text += f"\n<{link}|Open>"
    fallback = f"{content.title}: {content.body}"
    return {
        "text": fallback,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
    }


def teams_body(content: Content) -> dict[str, Any]:
    """A Teams MessageCard."""
    card: dict[str, Any] = {
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "summary": content.title,
        "title": content.title,
        "text": content.body,
    }
    if content.link and content.link.startswith("https://"):
        card["potentialAction"] = [
            {
                "@type": "OpenUri",
                "name": "Open",
                "targets": [{"os": "default", "uri": content.link}],
            }
        ]
    return card


class WebhookChatSender(PushSender):
    """aiohttp to incoming webhooks, a bucket per webhook."""

    provider = "chat"

    def __init__(
        self,
        config: ChatConfig,
        renderer: ChannelRenderer,
        bucket: BucketSpec,
        limiter: DestinationLimiter | None,
        timeout_s: float,
    ) -> None:
        self.bucket = bucket
        self._renderer = renderer
        self._client = HttpClient(timeout_s, config.ca_file, connections=64)
        self.concurrency = self._client.connections
        self._guard = HostGuard(config.allow_dev)
        self._pacer = KeyedPacer(
            "chat",
            limiter,
            config.webhook_rate_per_min,
            lambda r: webhook_key(r.item["token"]),
            "webhook",
        )

    def render(self, request: SendRequest) -> object:
        """The webhook's JSON (Teams' card or Slack's blocks); PayloadTooLarge past 40 KB."""
        content = self._renderer.content(request, limit=MAX_BODY_BYTES)
        url = request.item["token"]
        body = orjson.dumps(teams_body(content) if is_teams(url) else slack_body(content))
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"chat post is {len(body)} bytes (limit {MAX_BODY_BYTES})")
        return RenderedPost(url, body)

    async def _send_one(self, post: RenderedPost, lane: str) -> ProviderAnswer:
        refusal = await self._guard.refusal(post.url)
        if refusal is not None:
            return ProviderAnswer(400, "webhook_not_public", detail=refusal)
        reply = await self._client.post(
            post.url, data=post.body, headers={"Content-Type": "application/json"}, lane=lane
        )
        if isinstance(reply, ProviderAnswer):
            return reply
        if 200 <= reply.status < 300:
            return ProviderAnswer(reply.status, None)
        text = reply.text.strip()
        reason = text if _REASON.match(text) else None
        return ProviderAnswer(reply.status, reason, reply.retry_after_s, detail=text[:300] or None)

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """Every post at once; those whose webhook bucket is empty are held."""
        held = await self._pacer.admit(requests)
        go = [i for i in range(len(requests)) if i not in held]
        sent = await asyncio.gather(
            *(self._send_one(payloads[i], requests[i].lane) for i in go)  # type: ignore[arg-type]
        )
        answers = dict(held)
        answers.update(zip(go, sent, strict=True))
        return [answers[i] for i in range(len(requests))]

    async def close(self) -> None:
        """Close the connections."""
        await self._client.close()
