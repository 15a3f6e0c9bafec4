"""A local stand-in for Twilio's Messages API (HTTP/1.1 over TLS), with status callbacks.

`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded, basic auth (the account
id and the auth token). Answers as Twilio does:
- 201 `{"sid": "SM...", "status": "queued", "num_segments": "1", ...}`;
- 401 `{"code": 20003}` for wrong credentials; 400 `{"code": 21211}` for a `To` that is not
  E.164, 21602 without a Body, 21603 without a sender;
- faults: a number listed with `{"code": 21610}` is opted out (it replied STOP): 400
  `{"code": 21610, "message": "Attempt to send to unsubscribed recipient"}`; with
  `{"undelivered": 30006}` it is accepted and its status callback says `undelivered` with that
  ErrorCode; the rate limit answers 429 `{"code": 20429}` with Retry-After; an outage 503/500.

After a 201 it POSTs the status callback (`StatusCallback`): `sent`, then `delivered` (or
`undelivered`/`failed` with `ErrorCode`), form-encoded, signed with `X-Twilio-Signature`
(base64 HMAC-SHA1 of the URL and the sorted parameters, keyed by the auth token), as Twilio
does; what each callback got back is kept for the control API.

`inbound` plays a message sent to our number (a user replying STOP, START or HELP): a signed,
form-encoded POST of `From`, `To`, `Body`, `MessageSid` to the webhook URL given (Twilio's
"A message comes in" webhook); the answer (status and TwiML) is kept for the control API.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import ssl
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

from scripts.dev.local_channels.state import ChannelState
from scripts.dev.local_providers.http11 import Request, Response

E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_MESSAGES = re.compile(r"/2010-04-01/Accounts/([A-Za-z0-9]+)/Messages\.json")


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's request signature: HMAC-SHA1 over the URL and the sorted POST parameters."""
    data = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def _error(
    status: int, code: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return Response(status, json.dumps(body).encode(), headers)


def _segments(text: str) -> int:
    units = len(text.encode("utf-16-le")) // 2
    gsm = all(ord(c) < 128 for c in text)
    single, part = (160, 153) if gsm else (70, 67)
    return 1 if units <= single else -(-units // part)


class SmsServer:
    """The Messages API for one account."""

    def __init__(
        self, state: ChannelState, account_sid: str, auth_token: str, ca_file: str
    ) -> None:
        self.state = state
        self.account_sid = account_sid
        self.auth_token = auth_token
        expected = f"{account_sid}:{auth_token}".encode()
        self._basic = b"Basic " + base64.b64encode(expected)
        self._ca_file = ca_file
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: Any = None  # one aiohttp session for every callback, made on first use
        self.inbound_answers: list[dict[str, Any]] = []

    def handle(self, req: Request) -> Response:
        """Route one request."""
        if req.method == b"HEAD" or (req.method == b"GET" and req.path == "/"):
            return Response(200, b"", content_type=b"text/plain")
        match = _MESSAGES.fullmatch(req.path)
        if req.method != b"POST" or match is None:
            return _error(404, 20404, "The requested resource was not found")
        state = self.state
        state.requests += 1
        if match.group(1) != self.account_sid or req.headers.get(b"authorization") != self._basic:
            state.reject("20003")
            return _error(401, 20003, "Authenticate")
        faults = state.faults
        delay = faults.latency_s
        if faults.outage(time.monotonic()):
            state.reject("outage")
            return _error(faults.outage_status, 20500, "Service unavailable")
        if state.limited():
            state.reject("20429")
            retry = str(faults.rate_limit.retry_after_s if faults.rate_limit else 1).encode()
            return _error(429, 20429, "Too Many Requests", ((b"retry-after", retry),))
        form = {k: v[0] for k, v in parse_qs(req.body.decode(), keep_blank_values=True).items()}
        to, body = form.get("To", ""), form.get("Body", "")
        sender = form.get("From") or form.get("MessagingServiceSid")
        if not E164.fullmatch(to):
            state.reject("21211")
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not body:
            state.reject("21602")
            return _error(400, 21602, "Message body is required.")
        if not sender:
            state.reject("21603")
            return _error(400, 21603, "The source 'from' phone number is required to send an SMS")
        fault = faults.address_errors.get(to, {})
        if "code" in fault:
            code = int(fault["code"])
            state.reject(str(code))
            message = (
                "Attempt to send to unsubscribed recipient" if code == 21610 else f"Error {code}"
            )
            return _error(int(fault.get("status", 400)), code, message)
        sid = "SM" + secrets.token_hex(16)
        doc = {
            "sid": sid,
            "account_sid": self.account_sid,
            "to": to,
            "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "body": body,
            "status": "queued",
            "num_segments": str(_segments(body)),
            "num_media": "0",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "price": None,
            "price_unit": "USD",
            "error_code": None,
            "error_message": None,
            "date_created": formatdate(usegmt=True),
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
        state.record({**doc, "status_callback": form.get("StatusCallback")})
        callback = form.get("StatusCallback")
        if callback:
            task = asyncio.get_running_loop().create_task(
                self._callbacks(callback, sid, to, form, fault.get("undelivered"))
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return Response(201, json.dumps(doc).encode(), delay_s=delay)

    def _session(self) -> Any:
        import aiohttp

        if self._client is None:
            # One session for every callback, a bounded pool (a benchmark sends thousands).
            context = ssl.create_default_context(cafile=self._ca_file)
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=16),
                timeout=aiohttp.ClientTimeout(total=5),
            )
        return self._client

    def inbound(self, url: str, sender: str, to: str, body: str) -> str:
        """Post a message from `sender` to the webhook `url` (in the background); its sid."""
        sid = "SM" + secrets.token_hex(16)
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "Body": body,
            "From": sender,
            "MessageSid": sid,
            "NumMedia": "0",
            "NumSegments": "1",
            "SmsMessageSid": sid,
            "SmsSid": sid,
            "SmsStatus": "received",
            "To": to,
        }
        task = asyncio.get_running_loop().create_task(self._post_inbound(url, sid, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return sid

    async def _post_inbound(self, url: str, sid: str, params: dict[str, str]) -> None:
        import aiohttp
        import yarl

        headers = {"X-Twilio-Signature": twilio_signature(self.auth_token, url, params)}
        entry: dict[str, Any] = {"sid": sid, "from": params["From"], "body": params["Body"]}
        try:
            target = yarl.URL(url, encoded=True)
            async with self._session().post(target, data=params, headers=headers) as response:
                entry["status"] = response.status
                entry["content_type"] = response.headers.get("Content-Type", "")
                entry["answer"] = await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            entry["status"] = None
            entry["answer"] = type(exc).__name__
        self.inbound_answers.append(entry)

    async def _callbacks(
        self, url: str, sid: str, to: str, form: dict[str, str], error_code: Any
    ) -> None:
        import aiohttp
        import yarl

        self._session()
        final = "undelivered" if error_code else "delivered"
        for status in ("sent", final):
            await asyncio.sleep(0.05)
            params = {
                "AccountSid": self.account_sid,
                "ApiVersion": "2010-04-01",
                "From": form.get("From") or form.get("MessagingServiceSid", ""),
                "MessageSid": sid,
                "SmsSid": sid,
                "MessageStatus": status,
                "SmsStatus": status,
                "To": to,
            }
            if status == "undelivered":
                params["ErrorCode"] = str(error_code)
            headers = {"X-Twilio-Signature": twilio_signature(self.auth_token, url, params)}
            entry: dict[str, Any] = {"sid": sid, "status": status, "time": time.time()}
            try:
                # encoded=True: the URL goes out byte for byte as given, as Twilio sends it (yarl
                # would turn %3A into ":", and the signature is over the URL's exact text).
                target = yarl.URL(url, encoded=True)
                async with self._client.post(target, data=params, headers=headers) as response:
                    entry["answer"] = response.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                entry["answer"] = type(exc).__name__
                self.state.extra.append(entry)
                return  # nobody listens there: no point in the next status
            self.state.extra.append(entry)

    async def close(self) -> None:
        """Cancel callbacks still on their way."""
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.close()
