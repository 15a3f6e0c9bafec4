"""Parts of the local provider servers that need no server: credentials, the HPACK speedups,
the recorder and the rate limit."""

from __future__ import annotations

import ipaddress
import json
import random
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hpack.exceptions import HPACKDecodingError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman

from scripts.dev.local_providers.credentials import make_local_credentials
from scripts.dev.local_providers.speedups import fast_decode_huffman
from scripts.dev.local_providers.state import ProviderState, RateLimit


def test_credentials_are_generated_once_and_reused(tmp_path: Path) -> None:
    creds = make_local_credentials(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "apns_key.json",
        "apns_key.p8",
        "ca.key",
        "ca.pem",
        "fcm_service_account.json",
        "server.key",
        "server.pem",
    ]
    contents = {name: (tmp_path / name).read_bytes() for name in files}
    again = make_local_credentials(tmp_path)
    assert again == creds
    assert {name: (tmp_path / name).read_bytes() for name in files} == contents
    for name in ("apns_key.p8", "ca.key", "server.key", "fcm_service_account.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_credentials_have_the_shapes_the_clients_expect(tmp_path: Path) -> None:
    creds = make_local_credentials(tmp_path, fcm_token_uri="http://127.0.0.1:1234/token")
    assert len(creds.apns_key_id) == 10 and len(creds.apns_team_id) == 10
    assert json.loads(creds.apns_key_json.read_text()) == {
        "key_id": creds.apns_key_id,
        "team_id": creds.apns_team_id,
        "topic": "dev.fanfare.app",
    }
    key = load_pem_private_key(creds.apns_key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert creds.apns_key_pem().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8, as Apple's .p8
    cert = x509.load_pem_x509_certificate(creds.server_cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    ca = x509.load_pem_x509_certificate(creds.ca_file.read_bytes())
    assert cert.issuer == ca.subject
    sa = json.loads(creds.fcm_service_account_file.read_text())
    assert (sa["type"], sa["project_id"], sa["token_uri"]) == (
        "service_account",
        "fanfare-local",
        "http://127.0.0.1:1234/token",
    )
    assert isinstance(
        load_pem_private_key(sa["private_key"].encode(), password=None), rsa.RSAPrivateKey
    )
    assert (
        sa["client_email"] == creds.fcm_client_email
        and sa["private_key_id"]
        and sa["client_id"].isdigit()
    )


def test_a_new_token_uri_keeps_the_service_account_key(tmp_path: Path) -> None:
    creds = make_local_credentials(tmp_path, fcm_token_uri="http://127.0.0.1:1/token")
    before = json.loads(creds.fcm_service_account_file.read_text())
    make_local_credentials(tmp_path, fcm_token_uri="http://127.0.0.1:2/token")
    after = json.loads(creds.fcm_service_account_file.read_text())
    assert after == {**before, "token_uri": "http://127.0.0.1:2/token"}


def test_fast_huffman_decoder_matches_hpack() -> None:
    fast = fast_decode_huffman()
    encoder = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    rng = random.Random(7)
    for _ in range(3000):
        text = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        encoded = encoder.encode(text)
        assert fast(encoded) == decode_huffman(encoded) == text
        assert fast(encoded) == text  # the second time from its memo (long strings)

    def outcome(decode: object, data: bytes) -> bytes | str:
        try:
            return decode(data)  # type: ignore[operator,no-any-return]
        except HPACKDecodingError:
            return "error"

    # Invalid input (EOS inside, bad padding) fails where hpack's decoder fails.
    for _ in range(20000):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 10)))
        assert outcome(fast, junk) == outcome(decode_huffman, junk)


def test_recorder_keeps_fields_and_counts_duplicates() -> None:
    state = ProviderState("apns")
    state.record(b"tok", b"id-1", b"p1:u1", b"d1", b"p1", 42, (b"tok", b"p1:u1", b"d1"))
    state.record(b"tok", b"id-2", b"p1:u1", b"d1", b"", 42, (b"tok", b"p1:u1", b"d1"))
    state.record(b"t\x00k", b"id-3", b"", b"", b"", 7, (b"t\x00k", b"id-3"))  # a NUL in a field
    state.reject("Unregistered")
    rows = list(state.records(0, 10))
    assert [r[:5] for r in rows] == [
        ["tok", "id-1", "p1:u1", "d1", "p1"],
        ["tok", "id-2", "p1:u1", "d1", None],
        ["t\x00k", "id-3", None, None, None],
    ]
    assert [r[5] for r in rows] == [42, 42, 7]
    [third] = state.records(2, 3)
    assert third[1] == "id-3"
    stats = state.stats()
    assert (stats["accepted"], stats["distinct"], stats["duplicates"], stats["rejected"]) == (
        3,
        2,
        1,
        {"Unregistered": 1},
    )
    state.reset()
    assert state.stats()["accepted"] == 0 and list(state.records(0, 10)) == []


@pytest.mark.parametrize("per_second", [1, 10, 1000])
def test_rate_limit_is_a_bucket_of_one_second(per_second: int) -> None:
    limit = RateLimit(per_second, retry_after_s=1)
    t = limit._last
    assert sum(limit.take(t) for _ in range(per_second * 3)) == per_second
    assert sum(limit.take(t + 0.5) for _ in range(per_second * 3)) == per_second // 2
