"""Start the local channel servers inside an event loop (beside the local APNs and FCM).

Credentials are generated once in `<home>/channels/` and reused: the SMTP password, the SMS
auth token, the VAPID key, the link secret (FANFARE_LINK_SECRET_FILE). TLS uses the local
providers' CA and `localhost` certificate. `channel_settings` are the FANFARE_* lines that point
fanfare at these servers, written into the settings file with the push providers' ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from scripts.dev.local_channels.chat import ChatServer
from scripts.dev.local_channels.control import ChannelControl, ChannelControlApi
from scripts.dev.local_channels.sms import SmsServer
from scripts.dev.local_channels.smtp import smtp_factory
from scripts.dev.local_channels.state import CHANNELS, ChannelState
from scripts.dev.local_channels.webpush import WebPushServer
from scripts.dev.local_providers.credentials import LocalCredentials, _write
from scripts.dev.local_providers.http11 import Http11Protocol

HOST = "127.0.0.1"
SMTP_USER = "fanfare"
SMS_ACCOUNT = "AC" + "f" * 32
SMS_FROM = "+15005550006"
EMAIL_FROM = "fanfare <no-reply@fanfare.test>"
VAPID_SUBJECT = "mailto:dev@fanfare.test"


class ChannelsInfo(TypedDict):
    """providers.json "channels"."""

    smtp: dict[str, Any]
    sms: dict[str, Any]
    webpush: dict[str, Any]
    chat: dict[str, Any]
    control_url: str
    ca_file: str
    link_secret_file: str


@dataclass(frozen=True, slots=True)
class ChannelSecrets:
    """The generated credentials' files."""

    smtp_password_file: Path
    sms_token_file: Path
    vapid_key_file: Path
    link_secret_file: Path


def make_channel_secrets(home: Path) -> ChannelSecrets:
    """Generate what is missing in `home/channels` (files holding secrets are mode 600)."""
    folder = home / "channels"
    folder.mkdir(parents=True, exist_ok=True)
    files = ChannelSecrets(
        folder / "smtp_password",
        folder / "sms_auth_token",
        folder / "vapid_private_key.pem",
        folder / "link_secret",
    )
    if not files.smtp_password_file.exists():
        _write(files.smtp_password_file, secrets.token_urlsafe(18).encode() + b"\n", private=True)
    if not files.sms_token_file.exists():
        _write(files.sms_token_file, secrets.token_hex(16).encode() + b"\n", private=True)
    if not files.link_secret_file.exists():
        _write(files.link_secret_file, secrets.token_hex(32).encode() + b"\n", private=True)
    if not files.vapid_key_file.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(files.vapid_key_file, pem, private=True)
    return files


@dataclass
class RunningChannels:
    """The listening channel servers."""

    states: dict[str, ChannelState]
    servers: list[asyncio.Server]
    sms: SmsServer
    webpush: WebPushServer
    info: ChannelsInfo

    def control(self) -> ChannelControl:
        """A client of the control API."""
        return ChannelControl(self.info["control_url"])

    async def close(self) -> None:
        """Stop listening and cancel pending callbacks."""
        await self.sms.close()
        for server in self.servers:
            server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.wait_closed() for s in self.servers)), timeout=5
            )


async def serve_channels(home: Path, creds: LocalCredentials) -> RunningChannels:
    """Listen on 127.0.0.1 (free ports) with TLS from the local CA; credentials in `home`."""
    loop = asyncio.get_running_loop()
    files = make_channel_secrets(home)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(creds.server_cert_file), str(creds.server_key_file))
    states = {c: ChannelState(c) for c in CHANNELS}
    password = files.smtp_password_file.read_text().strip()
    token = files.sms_token_file.read_text().strip()
    sms = SmsServer(states["sms"], SMS_ACCOUNT, token, str(creds.ca_file))
    webpush = WebPushServer(states["webpush"])
    chat = ChatServer(states["chat"])
    control = ChannelControlApi(states, webpush, sms)
    servers = [
        await loop.create_server(smtp_factory(states["email"], tls, SMTP_USER, password), HOST, 0),
        await loop.create_server(
            lambda: Http11Protocol(sms.handle), HOST, 0, ssl=tls, backlog=1024
        ),
        await loop.create_server(
            lambda: Http11Protocol(webpush.handle), HOST, 0, ssl=tls, backlog=1024
        ),
        await loop.create_server(
            lambda: Http11Protocol(chat.handle), HOST, 0, ssl=tls, backlog=1024
        ),
        await loop.create_server(control.protocol, HOST, 0),
    ]
    smtp_port, sms_port, push_port, chat_port, control_port = (
        s.sockets[0].getsockname()[1] for s in servers
    )
    webpush.origin = f"https://localhost:{push_port}"
    info: ChannelsInfo = {
        "smtp": {
            "host": "localhost",
            "port": smtp_port,
            "username": SMTP_USER,
            "password_file": str(files.smtp_password_file),
            "from": EMAIL_FROM,
        },
        "sms": {
            "url": f"https://localhost:{sms_port}",
            "account_sid": SMS_ACCOUNT,
            "auth_token_file": str(files.sms_token_file),
            "from": SMS_FROM,
        },
        "webpush": {
            "origin": webpush.origin,
            "vapid_key_file": str(files.vapid_key_file),
            "subject": VAPID_SUBJECT,
        },
        "chat": {
            "origin": f"https://localhost:{chat_port}",
            "slack_example": f"https://localhost:{chat_port}/services/T000/B000/XXXX",
            "teams_example": f"https://localhost:{chat_port}/webhookb2/fanfare-local",
        },
        "control_url": f"http://{HOST}:{control_port}",
        "ca_file": str(creds.ca_file),
        "link_secret_file": str(files.link_secret_file),
    }
    return RunningChannels(states, servers, sms, webpush, info)


def channel_settings(info: ChannelsInfo) -> dict[str, str]:
    """FANFARE_* settings that point fanfare at the local channel servers."""
    smtp, sms, web = info["smtp"], info["sms"], info["webpush"]
    return {
        "FANFARE_DEV_MODE": "true",
        "FANFARE_LINK_SECRET_FILE": info["link_secret_file"],
        "FANFARE_CHANNEL_CA_FILE": info["ca_file"],
        "FANFARE_SMTP_HOST": smtp["host"],
        "FANFARE_SMTP_PORT": str(smtp["port"]),
        "FANFARE_SMTP_TLS": "starttls",
        "FANFARE_SMTP_USERNAME": smtp["username"],
        "FANFARE_SMTP_PASSWORD_FILE": smtp["password_file"],
        "FANFARE_SMTP_CA_FILE": info["ca_file"],
        "FANFARE_EMAIL_FROM": smtp["from"],
        "FANFARE_SMS_ACCOUNT_SID": sms["account_sid"],
        "FANFARE_SMS_AUTH_TOKEN_FILE": sms["auth_token_file"],
        "FANFARE_SMS_API_URL": sms["url"],
        "FANFARE_SMS_FROM": sms["from"],
        "FANFARE_WEBPUSH_VAPID_KEY_FILE": web["vapid_key_file"],
        "FANFARE_WEBPUSH_SUBJECT": web["subject"],
    }
