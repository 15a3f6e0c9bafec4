"""The local providers' settings, written into fanfare's settings file (`FANFARE_SETTINGS_FILE`).

fanfare reads its provider endpoints and credentials from the documented FANFARE_APNS_* and
FANFARE_FCM_* settings only; the local servers hand theirs over by writing those lines into the
settings file (`$FANFARE_HOME/settings.env`), and take them out again when they stop. Other
lines of the file are kept as they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HEADER = (
    "# the local APNs, FCM and channel servers (scripts/dev/local_providers, local_channels); "
    "removed when they stop"
)
_OLD_HEADER = (
    "# the local APNs and FCM servers (scripts/dev/local_providers); removed when they stop"
)


def provider_settings(info: Any) -> dict[str, str]:
    """FANFARE_* settings that point fanfare at the servers of a providers.json."""
    apns, fcm = info["apns"], info["fcm"]
    channels: dict[str, str] = {}
    if "channels" in info:
        from scripts.dev.local_channels.runner import channel_settings  # (imports this package)

        channels = channel_settings(info["channels"])
    return {
        "FANFARE_APNS_KEY_FILE": apns["key_file"],
        "FANFARE_APNS_KEY_ID": apns["key_id"],
        "FANFARE_APNS_TEAM_ID": apns["team_id"],
        "FANFARE_APNS_TOPIC": apns["topic"],
        "FANFARE_APNS_HOST": apns["host"],
        "FANFARE_APNS_PORT": str(apns["port"]),
        "FANFARE_APNS_CA_FILE": apns["ca_file"],
        "FANFARE_FCM_CREDENTIALS_FILE": fcm["credentials_file"],
        # The TLS endpoint speaks HTTP/2 as FCM does (about twice the sends/s of HTTP/1.1).
        "FANFARE_FCM_URL": fcm["https_url"],
        "FANFARE_FCM_CA_FILE": fcm["ca_file"],
        **channels,
    }


def _lines_without(path: Path, names: set[str], only_values: dict[str, str] | None) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    kept = []
    for line in lines:
        name, sep, value = line.partition("=")
        name = name.strip()
        if line.strip() in (HEADER, _OLD_HEADER):
            continue
        if sep and name in names and (only_values is None or only_values[name] == value.strip()):
            continue
        kept.append(line)
    return kept


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)  # a flow starting now never reads half a file


def write_provider_settings(path: Path, info: Any) -> None:
    """Put the servers' settings into the settings file (replacing earlier ones)."""
    ours = provider_settings(info)
    kept = _lines_without(path, set(ours), None)
    _write(path, [*kept, HEADER, *(f"{k}={v}" for k, v in ours.items())])


def remove_provider_settings(path: Path, info: Any) -> None:
    """Take the servers' settings out of the settings file (lines since changed are kept)."""
    ours = provider_settings(info)
    kept = _lines_without(path, set(ours), ours)
    if any(line.strip() for line in kept):
        _write(path, kept)
    else:
        path.unlink(missing_ok=True)
