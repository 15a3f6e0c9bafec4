"""Start the local providers in this process or as a subprocess.

In-process they run on a background thread with its own event loop; as a subprocess
(`python -m scripts.dev.local_providers`) they get a core of their own, which is what
benchmarks want.

Either way the servers write `<home>/providers.json` once they listen:

    {"apns": {"host", "port", "url", "ca_file", "key_file", "key_id", "team_id", "topic",
              "strict_tokens"},
     "fcm": {"url", "https_url", "ca_file", "project_id", "credentials_file", "token_uri",
             "access_token", "strict_tokens"},
     "channels": {"smtp", "sms", "webpush", "chat", "control_url", "ca_file",
                  "link_secret_file"}   (scripts/dev/local_channels/runner.py),
     "control_url", "pid"}
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NotRequired, Self, TypedDict

from scripts.dev.local_providers import speedups
from scripts.dev.local_providers.apns import ApnsServer
from scripts.dev.local_providers.control import ControlApi, ProviderControl
from scripts.dev.local_providers.credentials import LocalCredentials, make_local_credentials
from scripts.dev.local_providers.fcm import FcmServer
from scripts.dev.local_providers.settings_file import (
    remove_provider_settings,
    write_provider_settings,
)
from scripts.dev.local_providers.state import ProviderState

if TYPE_CHECKING:  # local_channels imports this package's modules: imported when used
    from scripts.dev.local_channels.control import ChannelControl
    from scripts.dev.local_channels.runner import ChannelsInfo, RunningChannels

HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parents[3]


class ApnsInfo(TypedDict):
    """providers.json "apns"."""

    host: str
    port: int
    url: str
    ca_file: str
    key_file: str
    key_id: str
    team_id: str
    topic: str
    strict_tokens: bool


class FcmInfo(TypedDict):
    """providers.json "fcm".

    `url` is plain HTTP/1.1; `https_url` the same server over TLS (`ca_file`), where ALPN offers
    HTTP/2 as the real FCM does. `access_token` is a fixed bearer the server accepts as well.
    """

    url: str
    https_url: str
    ca_file: str
    project_id: str
    credentials_file: str
    token_uri: str
    access_token: str
    strict_tokens: bool


class ProvidersInfo(TypedDict):
    """providers.json."""

    apns: ApnsInfo
    fcm: FcmInfo
    channels: NotRequired[ChannelsInfo]
    control_url: str
    pid: int


def load_info(home: Path) -> ProvidersInfo:
    """Read `<home>/providers.json`."""
    info: ProvidersInfo = json.loads((home / "providers.json").read_text())
    return info


@dataclass
class Running:
    """Listening servers inside an event loop."""

    home: Path
    credentials: LocalCredentials
    apns: ApnsServer
    fcm: FcmServer
    servers: list[asyncio.Server]
    info: ProvidersInfo
    settings_file: Path | None = None
    channels: RunningChannels | None = None

    async def close(self) -> None:
        """Stop listening, close every connection, remove providers.json."""
        if self.channels is not None:
            await self.channels.close()
        for server in self.servers:
            server.close()
        for apns_conn in list(self.apns.connections):
            if apns_conn.transport is not None:
                apns_conn.transport.abort()
        for fcm_conn in list(self.fcm.connections):
            if fcm_conn.transport is not None:
                fcm_conn.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.wait_closed() for s in self.servers)), timeout=5
            )
        path = self.home / "providers.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(path.read_text())["pid"] == self.info["pid"]:
                path.unlink()
        if self.settings_file is not None:
            remove_provider_settings(self.settings_file, self.info)


async def serve(
    home: Path,
    *,
    apns_port: int = 0,
    fcm_port: int = 0,
    control_port: int = 0,
    fcm_tls_port: int = 0,
    strict_tokens: bool = True,
    fcm_access_token: str | None = None,
    settings_file: Path | None = None,
    channels: bool = True,
    only: str | None = None,
) -> Running:
    """Generate or reuse credentials in `home`, listen on 127.0.0.1, write providers.json.

    With `settings_file`, also write the FANFARE_APNS_* / FANFARE_FCM_* settings that point
    fanfare at these servers there (fanfare's settings file), and take them out on close.
    With `channels` (the default), the local channel servers (SMTP, SMS, web push, chat) start
    too, and their settings go into the settings file as well.
    With `only` ("apns" or "fcm"), serve that provider alone (the other's ports are 0), so a
    benchmark can give each its own process and core, and see which one is the bound.
    """
    home = home.resolve()
    speedups.install()
    creds = make_local_credentials(home)
    loop = asyncio.get_running_loop()
    token = fcm_access_token or "local-fcm-" + secrets.token_urlsafe(16)
    apns = ApnsServer(ProviderState("apns"), creds, strict_tokens=strict_tokens)
    fcm = FcmServer(ProviderState("fcm"), creds, strict_tokens=strict_tokens, fixed_token=token)
    if only not in (None, "apns", "fcm"):
        raise ValueError(f"only: apns or fcm, not {only!r}")
    control = await loop.create_server(ControlApi(apns, fcm).protocol, HOST, control_port)
    servers = [control]
    control_port = control.sockets[0].getsockname()[1]
    if only != "fcm":
        apns_server = await loop.create_server(
            apns.protocol, HOST, apns_port, ssl=apns.ssl_context, backlog=1024
        )
        servers.append(apns_server)
        apns_port = apns_server.sockets[0].getsockname()[1]
    else:
        apns_port = 0
    if only != "apns":
        plain = await loop.create_server(fcm.protocol, HOST, fcm_port, backlog=1024)
        tls = await loop.create_server(
            fcm.protocol_tls, HOST, fcm_tls_port, ssl=fcm.ssl_context, backlog=1024
        )
        servers += [plain, tls]
        fcm_port = plain.sockets[0].getsockname()[1]
        fcm_tls_port = tls.sockets[0].getsockname()[1]
    else:
        fcm_port = fcm_tls_port = 0
    fcm_url = f"http://{HOST}:{fcm_port}"
    # The token endpoint's address is known only now: write it into the service account.
    creds = make_local_credentials(home, fcm_token_uri=f"{fcm_url}/token")
    fcm.token_uri = f"{fcm_url}/token"
    running_channels = None
    if channels and only is None:  # a one-provider server (benchmarks) serves no channels
        from scripts.dev.local_channels.runner import serve_channels

        running_channels = await serve_channels(home, creds)
    info: ProvidersInfo = {
        "apns": {
            "host": "localhost",
            "port": apns_port,
            "url": f"https://localhost:{apns_port}",
            "ca_file": str(creds.ca_file),
            "key_file": str(creds.apns_key_file),
            "key_id": creds.apns_key_id,
            "team_id": creds.apns_team_id,
            "topic": creds.apns_topic,
            "strict_tokens": strict_tokens,
        },
        "fcm": {
            "url": fcm_url,
            "https_url": f"https://localhost:{fcm_tls_port}",
            "ca_file": str(creds.ca_file),
            "project_id": creds.fcm_project_id,
            "credentials_file": str(creds.fcm_service_account_file),
            "token_uri": f"{fcm_url}/token",
            "access_token": token,
            "strict_tokens": strict_tokens,
        },
        "control_url": f"http://{HOST}:{control_port}",
        "pid": os.getpid(),
    }
    if running_channels is not None:
        info["channels"] = running_channels.info
    tmp = home / f".providers.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(home / "providers.json")  # readers never see half a file
    if settings_file is not None:
        write_provider_settings(settings_file, info)
    return Running(home, creds, apns, fcm, servers, info, settings_file, running_channels)


class _Handle:
    """What the in-process and the subprocess variants share: the info and a control client."""

    info: ProvidersInfo
    credentials: LocalCredentials

    @property
    def apns_host(self) -> str:
        """Host name the APNs certificate is valid for."""
        return self.info["apns"]["host"]

    @property
    def apns_port(self) -> int:
        """APNs (TLS, HTTP/2) port on 127.0.0.1."""
        return self.info["apns"]["port"]

    @property
    def fcm_url(self) -> str:
        """FCM base URL (plain HTTP/1.1)."""
        return self.info["fcm"]["url"]

    @property
    def control_url(self) -> str:
        """Control API base URL."""
        return self.info["control_url"]

    def control(self) -> ProviderControl:
        """A client of the control API."""
        return ProviderControl(self.control_url)

    def channel_control(self) -> ChannelControl:
        """A client of the local channel servers' control API."""
        from scripts.dev.local_channels.control import ChannelControl

        return ChannelControl(self.info["channels"]["control_url"])

    def stop(self) -> None:
        """Stop the servers."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalProviders(_Handle):
    """Servers running on a background thread of this process."""

    def __init__(
        self, running: Running, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self.running = running  # what the servers saw, for tests in the same process
        self.info = running.info
        self.credentials = running.credentials
        self.home = running.home
        self._loop = loop
        self._thread = thread

    def stop(self) -> None:
        """Close the servers and end the thread (idempotent)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=15)


def start_local_providers(
    home: Path,
    *,
    apns_port: int = 0,
    fcm_port: int = 0,
    control_port: int = 0,
    fcm_tls_port: int = 0,
    strict_tokens: bool = True,
    fcm_access_token: str | None = None,
    settings_file: Path | None = None,
) -> LocalProviders:
    """Run the servers on a daemon thread with its own event loop; returns once they listen.

    Port 0 picks a free port. Credentials live in `home` (reused if present).
    """
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[Running] = concurrent.futures.Future()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            running = loop.run_until_complete(
                serve(
                    home,
                    apns_port=apns_port,
                    fcm_port=fcm_port,
                    control_port=control_port,
                    fcm_tls_port=fcm_tls_port,
                    strict_tokens=strict_tokens,
                    fcm_access_token=fcm_access_token,
                    settings_file=settings_file,
                )
            )
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        ready.set_result(running)
        try:
            loop.run_forever()
            loop.run_until_complete(running.close())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="local-providers", daemon=True)
    thread.start()
    return LocalProviders(ready.result(timeout=60), loop, thread)


class ProvidersProcess(_Handle):
    """Servers running in a child process."""

    def __init__(
        self, proc: subprocess.Popen[bytes], info: ProvidersInfo, home: Path, log: Path
    ) -> None:
        self.proc = proc
        self.info = info
        self.home = home
        self.log = log
        self.credentials = make_local_credentials(home)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL if it does not go (idempotent)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn_local_providers(
    home: Path,
    *,
    apns_port: int = 0,
    fcm_port: int = 0,
    control_port: int = 0,
    fcm_tls_port: int = 0,
    strict_tokens: bool = True,
    timeout_s: float = 30.0,
    settings_file: Path | None = None,
    only: str | None = None,
) -> ProvidersProcess:
    """Start `python -m scripts.dev.local_providers` and wait until its providers.json is written.

    Its output goes to `<home>/providers.log`.
    """
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    info_path, log_path = home / "providers.json", home / "providers.log"
    with contextlib.suppress(FileNotFoundError):
        info_path.unlink()  # a stale file from an earlier run must not be mistaken for ours
    args = [sys.executable, "-m", "scripts.dev.local_providers", "--dir", str(home)]
    args += ["--apns-port", str(apns_port), "--fcm-port", str(fcm_port)]
    args += ["--control-port", str(control_port), "--fcm-tls-port", str(fcm_tls_port)]
    if not strict_tokens:
        args.append("--loose-tokens")
    if settings_file is not None:
        args += ["--settings-file", str(settings_file)]
    if only is not None:
        args += ["--serve", only]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"local providers exited with {proc.returncode}: "
                f"{log_path.read_text(errors='replace')[-2000:]}"
            )
        with contextlib.suppress(OSError, ValueError):
            info = load_info(home)
            if info.get("pid") == proc.pid:
                return ProvidersProcess(proc, info, home, log_path)
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"local providers did not start within {timeout_s}s (log: {log_path})")
