"""The real client libraries pointed at the local providers (for tests, the load test, the demo).

This is also the reference for configuring them: neither library has a setting for its endpoint,
so the host goes into aioapns' protocol class and the URL into firebase-admin's messaging service.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import google.auth.credentials
from aioapns import APNs
from aioapns.connection import APNsProductionClientProtocol

from scripts.dev.local_providers.runner import ProvidersInfo


class WindowAckingProtocol(APNsProductionClientProtocol):
    """aioapns' protocol, handing back HTTP/2 receive window for the error bodies it reads.

    aioapns never acknowledges received DATA, so each connection's 64 KiB receive window is used
    up by error bodies (~30-60 bytes each) and, after about 1,500 errors on one connection, every
    further error answer waits forever for window (successes, which have no body, still pass).
    Real APNs would stall it the same way; this subclass is the fix a client needs.
    """

    def on_data_received(self, data: bytes, stream_id: int) -> None:
        """Acknowledge the bytes (sent with the next flush), then let aioapns parse them."""
        self.conn.acknowledge_received_data(len(data), stream_id)
        super().on_data_received(data, stream_id)


def apns_client(info: ProvidersInfo, *, ack_window: bool = True, **kwargs: Any) -> APNs:
    """An aioapns client with token auth for the local APNs; call it inside a running loop.

    `kwargs` go to `APNs(...)` (e.g. max_connections, err_func). `ack_window=False` keeps
    aioapns' own protocol, window leak included.
    """
    a = info["apns"]
    client = APNs(
        key=Path(a["key_file"]).read_text(),  # the PEM text: aioapns does not take a path
        key_id=a["key_id"],
        team_id=a["team_id"],
        topic=a["topic"],
        use_sandbox=False,
        ssl_context=ssl.create_default_context(cafile=a["ca_file"]),
        **kwargs,
    )
    base = WindowAckingProtocol if ack_window else APNsProductionClientProtocol
    # Host and port are class attributes of the protocol in aioapns 4.0: subclass per client.
    client.pool.protocol_class = type(
        "LocalApnsProtocol", (base,), {"APNS_SERVER": a["host"], "APNS_PORT": a["port"]}
    )
    return client


class FixedTokenCredentials(google.auth.credentials.Credentials):
    """Google credentials holding one fixed bearer token; refreshing does nothing.

    (AnonymousCredentials would break on a 401, which firebase-admin answers with a refresh.)
    """

    def __init__(self, token: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.token = token

    def refresh(self, request: Any) -> None:
        """Keep the fixed token."""


def firebase_app(
    info: ProvidersInfo,
    name: str,
    *,
    retries: bool = False,
    fixed_token: bool = False,
    http2: bool = False,
    timeout_s: float = 30.0,
) -> Any:
    """A firebase_admin App whose messaging goes to the local FCM.

    Credentials are the generated service account (its token_uri is the local /token), or with
    `fixed_token` the server's fixed bearer. `retries=False` turns off the async client's own
    retries of 500/503 (4 retries with backoff: seconds per failed send). `http2=True` sends to
    the TLS listener, where httpx speaks HTTP/2 as it does to the real FCM; otherwise plain
    HTTP/1.1.
    """
    import firebase_admin
    from firebase_admin import _http_client, credentials, messaging
    from firebase_admin._retry import HttpxRetry

    f = info["fcm"]
    cred: Any
    if fixed_token:

        class _Fixed(credentials.Base):  # type: ignore[misc]
            def get_credential(self) -> google.auth.credentials.Credentials:
                return FixedTokenCredentials(f["access_token"])

        cred = _Fixed()
    else:
        cred = credentials.Certificate(f["credentials_file"])
    app = firebase_admin.initialize_app(
        cred, {"projectId": f["project_id"], "httpTimeout": timeout_s}, name=name
    )
    service = messaging._get_messaging_service(app)
    base = f["https_url"] if http2 else f["url"]
    # No endpoint setting exists: the service keeps the URL it formatted from FCM_URL.
    service._fcm_url = f"{base}/v1/projects/{f['project_id']}/messages:send"
    retry = HttpxRetry(max_retries=0) if not retries else _http_client.DEFAULT_HTTPX_RETRY_CONFIG
    if not retries or http2:
        service._async_client = _http_client.HttpxAsyncClient(
            credential=service._credential, timeout=timeout_s, retry_config=retry
        )
    if http2:
        from operators.adapters.providers.fcm import trust_private_ca

        trust_private_ca(service._async_client, service._credential, retry, f["ca_file"], timeout_s)
    return app
