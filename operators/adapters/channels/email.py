"""Email over SMTP (aiosmtplib), behind the engine's `PushSender` port.

Each worker keeps FANFARE_SMTP_CONNECTIONS connections to the relay (STARTTLS required, or
implicit TLS; AUTH with the password from FANFARE_SMTP_PASSWORD_FILE) and sends one message per
transaction, one recipient each, so every answer belongs to one address:

- 2xx after DATA: accepted;
- RCPT 5xx (no such user, no such domain, relaying denied): a hard bounce, `invalid_token`, and
  the engine deactivates the address through `device_changes` as it does a push token;
- 4xx anywhere (greylisting, a busy mailbox, a relay's rate limit) and RCPT 552 (mailbox full,
  which RFC 5321 says to treat as 452): retried with backoff;
- MAIL or DATA 5xx: the message itself is refused: `failed`;
- AUTH refused, a lost connection, a timeout: retried (and they count towards the breaker).

A message is multipart/alternative, text and HTML, rendered from the notification's template
(the HTML is the text in a small escaped layout). Social and marketing categories carry
`List-Unsubscribe` with an https one-click URL and `List-Unsubscribe-Post:
List-Unsubscribe=One-Click` (RFC 8058: `POST /v1/unsubscribe/{token}` on `fanfare api` turns
the category off for the user); transactional ones (a login code, a receipt) carry none: they
are not a subscription, and turning them off would break the account. The Message-ID is stable
per (notification, address), so a resend after a crash is recognisable downstream.

Bounces that come back later as delivery status notifications (a mailbox that accepted at RCPT
and bounces afterwards) go to the relay's bounce address, which fanfare does not read.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path
from urllib.parse import urlsplit

import jinja2

from operators.adapters.channels.content import ChannelRenderer, Content
from operators.adapters.channels.pacing import KeyedPacer
from operators.adapters.channels.ports import DestinationLimiter
from operators.adapters.channels.sessions import LanePool
from operators.delivery.model import ProviderAnswer, SendRequest
from operators.delivery.payloads import PayloadTooLarge
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec
from operators.notify.links import unsubscribe_token
from schemas.addresses import email_domain

MAX_MESSAGE_BYTES = 1024 * 1024
_MESSAGE_ID_NS = uuid.UUID("0c7a5a9e-4f0d-4a51-9d1c-6f1e9a2b7c31")
_HTML = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html lang="{{ lang }}"><head><meta charset="utf-8"><title>{{ title }}</title></head>
<body style="font-family:-apple-system,Segoe UI,Roboto,sans-serif;color:#222;max-width:560px">
<h1 style="font-size:20px">{{ title }}</h1>
<p style="font-size:16px;line-height:1.4;white-space:pre-line">{{ body }}</p>
{%- if link %}
<p><a href="{{ link }}" style="color:#0a58ca">Open</a></p>
{%- endif %}
{%- if unsubscribe %}
<hr style="border:none;border-top:1px solid #ddd">
<p style="font-size:12px;color:#666">You get this because of your notification settings.
<a href="{{ unsubscribe }}" style="color:#666">Unsubscribe</a> from these emails.</p>
{%- endif %}
</body></html>
"""
)


@dataclass(frozen=True, slots=True)
class EmailConfig:
    """Where and how to reach the relay, and what to sign unsubscribe links with."""

    host: str
    port: int
    tls: str  # starttls | tls | none
    username: str | None
    password_file: Path | None
    ca_file: Path | None
    sender: str  # the From header: `Name <addr>` or `addr`
    connections: int
    public_url: str
    link_secret: bytes | None
    domain_rate_per_min: int


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    """A message ready for DATA, and the envelope recipient."""

    recipient: str
    data: bytes


class _Connection:
    """One SMTP session, reconnected when it was lost."""

    def __init__(self, config: EmailConfig, password: str | None, timeout_s: float) -> None:
        import aiosmtplib

        context = ssl.create_default_context()
        if config.ca_file is not None:
            context.load_verify_locations(cafile=str(config.ca_file))
        self._smtp = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            use_tls=config.tls == "tls",
            start_tls=config.tls == "starttls",
            tls_context=context if config.tls != "none" else None,
            timeout=timeout_s,
            local_hostname="fanfare.localdomain",
        )
        self._username = config.username
        self._password = password

    async def ensure(self) -> None:
        """Connect, STARTTLS and AUTH unless connected."""
        if self._smtp.is_connected:
            return
        await self._smtp.connect()
        if self._username:
            await self._smtp.login(self._username, self._password or "")

    async def send(self, sender: str, message: RenderedEmail) -> ProviderAnswer:
        """One transaction; every outcome as an answer."""
        import aiosmtplib

        try:
            await self.ensure()
        except aiosmtplib.SMTPAuthenticationError as exc:
            await self.drop()
            return ProviderAnswer(exc.code, f"AUTH {exc.message}"[:300])
        except aiosmtplib.SMTPResponseException as exc:
            await self.drop()
            return ProviderAnswer(exc.code, f"CONNECT {exc.message}"[:300])
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.drop()
            return ProviderAnswer(None, f"connection: {type(exc).__name__}")
        try:
            _, reply = await self._smtp.sendmail(sender, [message.recipient], message.data)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = exc.recipients[0]
            return ProviderAnswer(refused.code, f"RCPT {refused.message}"[:300])
        except aiosmtplib.SMTPSenderRefused as exc:
            return ProviderAnswer(exc.code, f"MAIL {exc.message}"[:300])
        except aiosmtplib.SMTPDataError as exc:
            return ProviderAnswer(exc.code, f"DATA {exc.message}"[:300])
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            await self.drop()
            return ProviderAnswer(None, f"connection: {type(exc).__name__}")
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:  # the server is closing the session
                await self.drop()
            return ProviderAnswer(exc.code, f"SMTP {exc.message}"[:300])
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.drop()
            return ProviderAnswer(None, f"connection: {type(exc).__name__}")
        return ProviderAnswer(250, None, detail=reply[:200])

    async def drop(self) -> None:
        """Forget the session (the next send reconnects)."""
        with contextlib.suppress(Exception):  # closing a broken session must not fail a send
            self._smtp.close()

    async def quit(self) -> None:
        """QUIT politely, or just close."""
        import aiosmtplib

        if self._smtp.is_connected:
            try:
                await asyncio.wait_for(self._smtp.quit(), 2)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                await self.drop()


class SmtpEmailSender(PushSender):
    """aiosmtplib to one relay, a pool of sessions, a rate-limit bucket per recipient domain."""

    provider = "email"

    def __init__(
        self,
        config: EmailConfig,
        renderer: ChannelRenderer,
        bucket: BucketSpec,
        limiter: DestinationLimiter | None,
        timeout_s: float,
    ) -> None:
        self.bucket = bucket
        self._config = config
        self._renderer = renderer
        self._timeout = timeout_s
        name, self._from_address = parseaddr(config.sender)
        self._from_header = formataddr((name, self._from_address), charset="utf-8")
        self._from_domain = email_domain(self._from_address)
        password = None
        if config.password_file is not None:
            password = config.password_file.read_text().removesuffix("\n").removesuffix("\r")
        self._connections = [
            _Connection(config, password, timeout_s) for _ in range(config.connections)
        ]
        self.concurrency = config.connections
        # Free sessions go to a transactional message first (sessions.py says why).
        self._idle: LanePool[_Connection] = LanePool(self._connections)
        self._pacer = KeyedPacer(
            "email",
            limiter,
            config.domain_rate_per_min,
            lambda r: email_domain(r.item["token"]),
            "domain",
        )

    async def warm_up(self) -> None:
        """Open one session (TLS and AUTH) before the first send."""
        connection = await self._idle.get("transactional")
        try:
            await asyncio.wait_for(connection.ensure(), self._timeout)
        finally:
            self._idle.put(connection)

    def unsubscribe_url(self, content: Content) -> str | None:
        """The one-click URL for a subscription-like category (none for transactional ones)."""
        if content.tier == "transactional" or self._config.link_secret is None:
            return None
        token = unsubscribe_token(
            self._config.link_secret, content.user_id, content.category, time.time()
        )
        return f"{self._config.public_url}/v1/unsubscribe/{token}"

    def render(self, request: SendRequest) -> object:
        """A MIME message (text and HTML), ready for DATA; PayloadTooLarge past 1 MiB."""
        content = self._renderer.content(request)
        recipient = request.item["token"]
        unsubscribe = self.unsubscribe_url(content)
        key = f"{request.item['notification_id']}|{request.item['device_id']}"
        headers = [
            ("From", self._from_header),
            ("To", recipient),
            ("Subject", content.title),
            ("Date", format_datetime(datetime.now(UTC))),
            ("Message-ID", f"<{uuid.uuid5(_MESSAGE_ID_NS, key)}@{self._from_domain}>"),
            ("X-Fanfare-Notification", request.item["notification_id"]),
            ("X-Fanfare-Category", content.category),
        ]
        if unsubscribe is not None:
            headers.append(("List-Unsubscribe", f"<{unsubscribe}>"))
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        text = [content.title, "", content.body]
        if content.link:
            text += ["", content.link]
        if unsubscribe:
            text += ["", "--", f"Unsubscribe from these emails: {unsubscribe}"]
        web_link = content.link if _is_web_link(content.link) else None
        html = _HTML.render(
            lang=(content.locale or "en"),
            title=content.title,
            body=content.body,
            link=web_link,
            unsubscribe=unsubscribe,
        )
        data = mime_alternative(headers, "\n".join(text) + "\n", html)
        if len(data) > MAX_MESSAGE_BYTES:
            raise PayloadTooLarge(f"email is {len(data)} bytes (limit {MAX_MESSAGE_BYTES})")
        return RenderedEmail(recipient, data)

    async def _send_one(self, message: RenderedEmail, lane: str) -> ProviderAnswer:
        connection = await self._idle.get(lane)
        try:
            return await asyncio.wait_for(
                connection.send(self._from_address, message), self._timeout
            )
        except TimeoutError:
            await connection.drop()  # the session is in an unknown state
            return ProviderAnswer(None, "timeout")
        finally:
            self._idle.put(connection)

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """Every message over the pool's sessions; per-domain holds answered at once."""
        held = await self._pacer.admit(requests)
        go = [i for i in range(len(requests)) if i not in held]
        sent = await asyncio.gather(
            *(self._send_one(payloads[i], requests[i].lane) for i in go)  # type: ignore[arg-type]
        )
        answers = dict(held)
        answers.update(zip(go, sent, strict=True))
        return [answers[i] for i in range(len(requests))]

    async def close(self) -> None:
        """QUIT every session."""
        await asyncio.gather(*(c.quit() for c in self._connections))


def _header_value(value: str) -> str:
    """A header value: as it is when ASCII, else RFC 2047 encoded words (UTF-8)."""
    value = value.replace("\r", " ").replace("\n", " ")
    if value.isascii():
        return value
    return Header(value, "utf-8", maxlinelen=998).encode()


def _quoted_printable(text: str) -> bytes:
    """UTF-8 text as quoted-printable with CRLF line ends (RFC 2045)."""
    raw = text.replace("\r\n", "\n").encode("utf-8")
    return binascii.b2a_qp(raw, istext=True).replace(b"\n", b"\r\n")


def mime_alternative(headers: Sequence[tuple[str, str]], text: str, html: str) -> bytes:
    """A multipart/alternative message (text, then HTML), both quoted-printable.

    Built by hand: Python's `email` package took about 3 ms per message (header registry,
    folding, generator), most of an email's client CPU. The boundary starts with `=_`, which a
    quoted-printable body never holds (it writes `=` as `=3D`).
    """
    boundary = f"=_fanfare_{uuid.uuid4().hex}"
    head = "".join(f"{name}: {_header_value(value)}\r\n" for name, value in headers)
    head += f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="{boundary}"\r\n'
    part = "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    return b"".join(
        (
            head.encode("ascii"),
            b"\r\n",
            f'--{boundary}\r\nContent-Type: text/plain; charset="utf-8"\r\n{part}'.encode(),
            _quoted_printable(text),
            f'\r\n--{boundary}\r\nContent-Type: text/html; charset="utf-8"\r\n{part}'.encode(),
            _quoted_printable(html),
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )


def _is_web_link(link: str | None) -> bool:
    return link is not None and urlsplit(link).scheme in ("https", "http")
