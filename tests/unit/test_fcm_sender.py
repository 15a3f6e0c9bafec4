"""The FCM sender's firebase app: a name of its own in the process (issue 20)."""

from __future__ import annotations

import gc
from pathlib import Path

import firebase_admin

from operators.adapters.providers.config import FcmConfig
from operators.adapters.providers.fcm import FcmSender
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
