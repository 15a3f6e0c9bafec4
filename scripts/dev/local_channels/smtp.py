"""A local SMTP submission server on aiosmtpd: STARTTLS required, AUTH required, records mail.

It answers as a relay would: `250` for an accepted message; a recipient listed in the faults
gets that code at RCPT (`550 5.1.1` for a hard bounce, `451 4.7.1` for greylisting, `552` for a
full mailbox); an outage answers `421` (closing) or `451` at MAIL; the injected rate limit
answers `451 4.7.1` at MAIL; latency holds the DATA answer back. Commands before STARTTLS other
than EHLO/NOOP/QUIT get `530`; AUTH before TLS is refused; wrong credentials get `535 5.7.8`.

Each accepted message is recorded with its envelope, its headers (Message-ID, Subject,
List-Unsubscribe, List-Unsubscribe-Post, X-Fanfare-Notification), its text and HTML parts,
and whether it came over TLS after AUTH; one whose Message-ID was seen before is marked
`resend` (fanfare's Message-ID is stable per notification and address).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import time
import uuid
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from scripts.dev.local_channels.state import ChannelState


def _part(message: EmailMessage, subtype: str) -> str | None:
    body = message.get_body(preferencelist=(subtype,))
    return None if body is None else str(body.get_content())


class SmtpHandler:
    """aiosmtpd's handler: the fault rules, then a record of each message."""

    def __init__(self, state: ChannelState) -> None:
        self.state = state

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Outages and the rate limit answer here, before any recipient."""
        state = self.state
        state.requests += 1
        if state.faults.outage(time.monotonic()):
            state.reject("outage")
            if state.faults.outage_status == 421:
                return "421 4.3.2 Service not available, closing transmission channel"
            return "451 4.3.0 Temporary local problem, try again later"
        if state.limited():
            state.reject("rate_limited")
            return "451 4.7.1 Too many messages, slow down"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """A recipient listed in the faults gets its code; the others are accepted."""
        fault = self.state.faults.address_errors.get(address.lower())
        if fault is not None:
            code = int(fault.get("code", 550))
            self.state.reject(str(code))
            return f"{code} {fault.get('message', '5.1.1 No such user here')}"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the message."""
        raw = envelope.original_content or b""
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        queue_id = uuid.uuid4().hex[:12]
        self.state.record(
            {
                "queue_id": queue_id,
                "mail_from": envelope.mail_from,
                "rcpt_to": list(envelope.rcpt_tos),
                "message_id": parsed["Message-ID"],
                "subject": parsed["Subject"],
                "from": parsed["From"],
                "to": parsed["To"],
                "list_unsubscribe": parsed["List-Unsubscribe"],
                "list_unsubscribe_post": parsed["List-Unsubscribe-Post"],
                "notification_id": parsed["X-Fanfare-Notification"],
                "category": parsed["X-Fanfare-Category"],
                "content_type": parsed.get_content_type(),
                "text": _part(parsed, "plain"),
                "html": _part(parsed, "html"),
                "size": len(raw),
                "tls": session.ssl is not None,
                "authenticated": bool(session.authenticated),
            },
            key=parsed["Message-ID"],
        )
        if self.state.faults.latency_s:
            await asyncio.sleep(self.state.faults.latency_s)
        return f"250 2.0.0 Ok: queued as {queue_id}"


def smtp_factory(state: ChannelState, tls: ssl.SSLContext, username: str, password: str) -> Any:
    """A protocol factory for loop.create_server: one aiosmtpd session per connection."""
    handler = SmtpHandler(state)

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == username
            and data.password.decode() == password
        )
        if not ok:
            state.reject("auth")
        return AuthResult(success=ok, handled=False)  # handled=True would send no answer

    def make() -> SMTP:
        return SMTP(
            handler,
            hostname="localhost",
            ident="fanfare local SMTP",
            tls_context=tls,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            authenticator=authenticate,
            data_size_limit=10 * 1024 * 1024,
        )

    return make
