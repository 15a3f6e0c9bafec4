"""The FCM sender: a firebase app name of its own, an OAuth token renewed between sends."""

from __future__ import annotations

import gc
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import firebase_admin

from operators.adapters.providers.config import FcmConfig
from operators.adapters.providers.fcm import FcmSender, token_needs_refresh
from operators.delivery.model import RetryPolicy
from operators.delivery.payloads import PushTemplate
from operators.delivery.token_bucket import BucketSpec
from scripts.dev.local_providers.credentials import make_local_credentials


def test_senders_dropped_without_closing_never_make_a_name_clash(tmp_path: Path) -> None:
    """An app name made of id(loop) was reused once the loop was freed: ValueError, a crash.

    A dropped engine's firebase app stays registered (nothing closed it), so every later
    sender must still get a new name.
    """
    creds = make_local_credentials(tmp_path)
    config = FcmConfig("http://127.0.0.1:9", creds.fcm_service_account_file, creds.fcm_project_id)
    names = []
    for _ in range(5):
        sender = FcmSender(
            config, PushTemplate("t", "b", "l"), BucketSpec("fcm:t", 600), RetryPolicy(), 1.0
        )
        names.append(sender._app.name)
        del sender
        gc.collect()
    assert len(set(names)) == 5
    for name in names:
        firebase_admin.delete_app(firebase_admin.get_app(name))


def test_the_oauth_token_is_renewed_before_google_auth_would_renew_it_in_a_request() -> None:
    """google-auth renews 3 min 45 s before expiry, blocking the event loop in a request."""
    now = datetime(2026, 6, 1, 12, 0)
    fresh = SimpleNamespace(token="t", expiry=now + timedelta(minutes=30))
    assert not token_needs_refresh(fresh, now)
    assert token_needs_refresh(SimpleNamespace(token="t", expiry=now + timedelta(minutes=4)), now)
    assert token_needs_refresh(SimpleNamespace(token=None, expiry=None), now)  # none yet
