"""`python -m scripts.dev.secrets DIR`: placeholder push credentials for trying docker compose.

Writes an APNs token-auth key (`AuthKey_<KEYID>.p8`, EC P-256 as Apple hands them out) and a
Firebase service-account JSON into DIR (`./secrets` is what docker-compose.yml mounts), and
prints the `.env` lines that name them. They are well-formed but unknown to Apple and Google:
the delivery service starts with them and its pushes are refused (403 InvalidProviderToken,
401 THIRD_PARTY_AUTH_ERROR, counted as `failed`). Put real ones there to send for real.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from scripts.dev.local_providers.credentials import make_local_credentials

MOUNTED_AT = "/run/fanfare-secrets"
"""Where docker-compose.yml mounts ./secrets in the delivery container."""


def write_placeholders(directory: Path) -> dict[str, str]:
    """Write the two files into `directory`; the .env settings that name them (in the container)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        made = make_local_credentials(Path(scratch))
        key = directory / f"AuthKey_{made.apns_key_id}.p8"
        account = directory / "service-account.json"
        shutil.copyfile(made.apns_key_file, key)
        shutil.copyfile(made.fcm_service_account_file, account)
    for path in (key, account):
        # Readable by the image's user (uid 10001): these are placeholders. Real credentials:
        # `chown 10001 secrets/*` and `chmod 600` (docs/operations.md, "Credentials").
        path.chmod(0o644)
    return {
        "FANFARE_APNS_KEY_FILE": f"{MOUNTED_AT}/{key.name}",
        "FANFARE_APNS_KEY_ID": made.apns_key_id,
        "FANFARE_APNS_TEAM_ID": made.apns_team_id,
        "FANFARE_APNS_TOPIC": made.apns_topic,
        "FANFARE_FCM_CREDENTIALS_FILE": f"{MOUNTED_AT}/{account.name}",
    }


def main(argv: list[str] | None = None) -> int:
    """Write the placeholders and print the .env lines."""
    parser = argparse.ArgumentParser(prog="python -m scripts.dev.secrets", description=__doc__)
    parser.add_argument("dir", nargs="?", default="secrets", help="where to write (./secrets)")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    if any(directory.glob("AuthKey_*.p8")) or (directory / "service-account.json").exists():
        print(
            f"{directory} already holds credentials: remove them first (never overwritten)",
            file=sys.stderr,
        )
        return 1
    settings = write_placeholders(directory)
    print(f"# placeholder credentials in {directory}; for .env (docker compose reads it):")
    for name, value in settings.items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
