"""SMS through a Twilio-shaped Messages API, behind the engine's `PushSender` port.

`POST {FANFARE_SMS_API_URL}/2010-04-01/Accounts/{sid}/Messages.json`, form-encoded (`To`,
`From` or `MessagingServiceSid`, `Body`, `StatusCallback`), basic auth with the account id and
the token from FANFARE_SMS_AUTH_TOKEN_FILE; 201 with the message's `sid` and `num_segments`.

SMS costs money per message, so before a message leaves:
- its category must be SMS-eligible (the categories file: `sms_eligible = true`), else
  `failed` with `category_not_sms_eligible` (403);
- the user's daily budget and the global one (FANFARE_SMS_USER_DAILY_LIMIT,
  FANFARE_SMS_DAILY_LIMIT, UTC days, counted in Redis and shared by every worker) must have
  room, else `failed` with `sms_budget_user` / `sms_budget_global` (402). A message the provider
  did not accept gives its unit back.
Each accepted message counts its segments and cost (`fanfare_sms_segments_total`,
`fanfare_sms_cost_micros_total{currency}`).

Answers: Twilio error 21610 (the recipient replied STOP) and 21211/21614 (not a valid mobile
number) are a dead address: `invalid_token`, and the engine deactivates the number through
`device_changes`; 429 (20429, with Retry-After) and 5xx are retried; other 4xx fail. The status
callback (`StatusCallback`, signed by the provider with the auth token) goes to `fanfare api`
(`POST /v1/callbacks/sms`), which records `delivered` as an ack and deactivates a number the
carrier reports as unreachable or opted out.

Twilio has no idempotency key for messages: a send resent after a crash (the engine's RESEND)
may reach the phone twice.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import orjson
from redis.exceptions import RedisError

from operators import metrics
from operators.adapters.channels.content import ChannelRenderer
from operators.adapters.channels.http import HttpClient
from operators.adapters.channels.ports import SmsBudget
from operators.delivery.model import ProviderAnswer, SendRequest
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec

log = logging.getLogger(__name__)

MAX_BODY_CHARS = 1600
"""Twilio's longest body (10 segments of 160 GSM-7 characters)."""
GSM7 = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")


def segments(text: str) -> int:
    """How many SMS segments a text takes (GSM-7: 160, or 153 each when split; UCS-2: 70/67)."""
    if all(c in GSM7 or c in GSM7_EXTENDED for c in text):
        units = len(text) + sum(c in GSM7_EXTENDED for c in text)
        single, part = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, part = 70, 67
    return 1 if units <= single else -(-units // part)


def sms_text(title: str, body: str, link: str | None) -> str:
    """What the SMS says: the title, the body and a web link, within 1,600 characters."""
    text = f"{title}\n{body}" if title and body else title or body
    if link and link.startswith(("https://", "http://")):
        text = f"{text}\n{link}"
    return text if len(text) <= MAX_BODY_CHARS else text[: MAX_BODY_CHARS - 1] + "…"


@dataclass(frozen=True, slots=True)
class SmsConfig:
    """Where the Messages API is and who sends."""

    api_url: str
    account_sid: str
    auth_token_file: Path
    sender: str  # +E.164, or a messaging service id (MG...)
    ca_file: Path | None
    public_url: str  # for StatusCallback
    cost_micros: int
    currency: str


@dataclass(frozen=True, slots=True)
class RenderedSms:
    """The form of one Messages API request."""

    form: dict[str, str]
    segments: int


class TwilioSmsSender(PushSender):
    """aiohttp to a Twilio-shaped Messages API, with the eligibility and budget checks."""

    provider = "sms"

    def __init__(
        self,
        config: SmsConfig,
        renderer: ChannelRenderer,
        bucket: BucketSpec,
        budget: SmsBudget,
        timeout_s: float,
    ) -> None:
        self.bucket = bucket
        self._config = config
        self._renderer = renderer
        self._budget = budget
        token = config.auth_token_file.read_text().strip()
        basic = base64.b64encode(f"{config.account_sid}:{token}".encode()).decode()
        self._headers = {"Authorization": f"Basic {basic}"}
        self._url = (
            f"{config.api_url.rstrip('/')}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        )
        self._client = HttpClient(timeout_s, config.ca_file)
        self.concurrency = self._client.connections

    async def warm_up(self) -> None:
        """Open a connection (TLS) to the API before the first send."""
        await self._client.head(self._config.api_url)

    def render(self, request: SendRequest) -> object:
        """The form: To, From (or MessagingServiceSid), Body, StatusCallback."""
        content = self._renderer.content(request, limit=MAX_BODY_CHARS * 4)
        body = sms_text(content.title, content.body, content.link)
        item = request.item
        form = {"To": item["token"], "Body": body}
        if self._config.sender.startswith("MG"):
            form["MessagingServiceSid"] = self._config.sender
        else:
            form["From"] = self._config.sender
        query = urlencode(
            {"n": item["notification_id"], "d": item["device_id"], "u": item["user_id"]}
        )
        form["StatusCallback"] = f"{self._config.public_url}/v1/callbacks/sms?{query}"
        return RenderedSms(form, segments(body))

    async def _send_one(self, request: SendRequest, sms: RenderedSms) -> ProviderAnswer:
        if not self._renderer.sms_eligible(request):
            return ProviderAnswer(403, "category_not_sms_eligible")
        try:
            spent = await self._budget.take(request.item["user_id"])
        except (RedisError, OSError) as exc:
            # This message's answer only (not sent: retried). Raised out of `send`, it failed
            # the siblings already accepted by the provider, and they were sent twice.
            return ProviderAnswer(None, f"sms_budget: {type(exc).__name__}")
        if spent is not None:
            metrics.SMS_BUDGET_REFUSED.labels(spent).inc()
            return ProviderAnswer(402, f"sms_budget_{spent}")
        answer = await self._post(sms, request.lane)
        if answer.status is not None and 200 <= answer.status < 300:
            metrics.SMS_SEGMENTS.inc(sms.segments)
            metrics.SMS_COST.labels(self._config.currency).inc(
                sms.segments * self._config.cost_micros
            )
        else:
            try:
                await self._budget.give_back(request.item["user_id"])
            except (RedisError, OSError) as exc:  # the answer stands; the unit stays counted
                log.warning("sms budget: a unit not given back: %s", type(exc).__name__)
        return answer

    async def _post(self, sms: RenderedSms, lane: str) -> ProviderAnswer:
        reply = await self._client.post(self._url, data=sms.form, headers=self._headers, lane=lane)
        if isinstance(reply, ProviderAnswer):
            return reply
        if 200 <= reply.status < 300:
            return ProviderAnswer(reply.status, None)
        code, message = None, None
        try:
            doc = orjson.loads(reply.text)
            code, message = doc.get("code"), doc.get("message")
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return ProviderAnswer(
            reply.status,
            str(code) if code is not None else None,
            reply.retry_after_s,
            detail=(message or reply.text)[:300] or None,
        )

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """One API request per message, all at once."""
        return list(
            await asyncio.gather(
                *(
                    self._send_one(r, p)  # type: ignore[arg-type]
                    for r, p in zip(requests, payloads, strict=True)
                )
            )
        )

    async def close(self) -> None:
        """Close the connections."""
        await self._client.close()
