"""Who is calling (SPEC §4): JWTs (HS256/384/512, `username` required), static tokens,
the admin flag; and the exact 401/403 envelopes the HTTP API answers with."""

from __future__ import annotations

import hashlib
import time
import warnings
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

import fa_restic.api.auth as auth_module
from fa_restic.api.auth import Authenticator
from fa_restic.api.errors import ApiError
from fa_restic.config import AuthSettings, StaticToken
from fa_restic.jobs.service import Caller
from tests.helpers import API, JWT_SECRET, token_for

SCRIPT_TOKEN = "script-token-0123456789"
PLAIN_TOKEN = "plain-token-abcdef"

STATIC_TOKENS_TOML = f"""
[[auth.tokens]]
token_sha256 = "{hashlib.sha256(SCRIPT_TOKEN.encode()).hexdigest()}"
user = "ops"
admin = true

[[auth.tokens]]
token = "{PLAIN_TOKEN}"
user = "bob"
"""


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator(
        AuthSettings(
            jwt_secret=JWT_SECRET,
            tokens=[
                StaticToken(
                    token_sha256=hashlib.sha256(SCRIPT_TOKEN.encode()).hexdigest(),
                    user="ops",
                    admin=True,
                ),
                StaticToken(token=PLAIN_TOKEN, user="bob"),
            ],
        )
    )


def _jwt(claims: dict[str, Any], algorithm: str = "HS256", secret: str = JWT_SECRET) -> str:
    with warnings.catch_warnings():  # the test secret is shorter than HS512's 64 bytes
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm)


def _refused(authenticator: Authenticator, header: str | None) -> str:
    with pytest.raises(ApiError) as raised:
        authenticator.authenticate(header)
    assert (raised.value.http_status, raised.value.code) == (401, 401)
    return raised.value.message


# (Authorization header, the message of the 401) for every way a token can be wrong.
REFUSALS: list[tuple[str | None, str]] = [
    (None, "unauthorized: missing Authorization header"),
    ("", "unauthorized: missing Authorization header"),
    ("Basic YWxpY2U6cHc=", "unauthorized: expected 'Authorization: Bearer <token>'"),
    ("Bearer", "unauthorized: expected 'Authorization: Bearer <token>'"),
    ("Bearer    ", "unauthorized: expected 'Authorization: Bearer <token>'"),
    ("Bearer not-a-known-token", "unauthorized: unknown token"),
    (
        "Bearer " + _jwt({"username": "alice"}, "none", None),  # type: ignore[arg-type]
        "unauthorized: token algorithm not allowed (HS256, HS384, HS512)",
    ),
    (
        "Bearer " + _jwt({"username": "alice", "exp": int(time.time()) - 60}),
        "unauthorized: token expired",
    ),
    (
        "Bearer " + _jwt({"username": "alice"}, secret="another-secret-that-is-long-enough-0123"),
        "unauthorized: bad token signature",
    ),
    (
        "Bearer " + _jwt({"userId": 7, "tenantId": 1}),
        "unauthorized: token has no username claim",
    ),
    (
        "Bearer " + _jwt({"username": "../root"}),
        "unauthorized: username claim is not a valid user name",
    ),
    (
        "Bearer " + _jwt({"username": "a,b"}),
        "unauthorized: username claim is not a valid user name",
    ),
    ("Bearer " + _jwt({"username": 42}), "unauthorized: username claim is not a valid user name"),
    ("Bearer " + _jwt({"username": ""}), "unauthorized: username claim is not a valid user name"),
    (
        "Bearer " + _jwt({"username": "alice", "nbf": int(time.time()) + 3600}),
        "unauthorized: invalid token (ImmatureSignatureError)",
    ),
    ("Bearer a.b.c", "unauthorized: invalid token (DecodeError)"),
    # A static token's digest, sent as the token, is not the token.
    (
        "Bearer " + hashlib.sha256(SCRIPT_TOKEN.encode()).hexdigest(),
        "unauthorized: unknown token",
    ),
]


@pytest.mark.parametrize(("header", "message"), REFUSALS)
def test_refused(authenticator: Authenticator, header: str | None, message: str) -> None:
    assert _refused(authenticator, header) == message


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_hmac_algorithms_are_accepted(authenticator: Authenticator, algorithm: str) -> None:
    token = _jwt({"username": "alice"}, algorithm)
    assert authenticator.authenticate(f"Bearer {token}") == Caller("alice", admin=False)


def test_platform_claims_may_come_along(authenticator: Authenticator) -> None:
    token = _jwt(
        {
            "username": "alice",
            "userId": 17,
            "tenantId": 3,
            "linuxUid": 1017,
            "linuxGid": 1017,
            "exp": int(time.time()) + 3600,
        }
    )
    assert authenticator.authenticate(f"Bearer {token}") == Caller("alice", admin=False)


def test_admin_flag(authenticator: Authenticator) -> None:
    assert authenticator.authenticate(f"Bearer {token_for('root', admin=True)}").admin
    assert not authenticator.authenticate(f"Bearer {token_for('root', admin=False)}").admin
    # Only a JSON true makes an admin.
    for value in ("true", 1, "yes"):
        token = _jwt({"username": "root", "admin": value})
        assert not authenticator.authenticate(f"Bearer {token}").admin, value


def test_scheme_is_case_insensitive(authenticator: Authenticator) -> None:
    assert authenticator.authenticate(f"bearer {token_for('alice')}") == Caller("alice")


def test_static_tokens(authenticator: Authenticator) -> None:
    assert authenticator.authenticate(f"Bearer {SCRIPT_TOKEN}") == Caller("ops", admin=True)
    assert authenticator.authenticate(f"Bearer {PLAIN_TOKEN}") == Caller("bob", admin=False)


def test_without_a_jwt_secret_only_static_tokens_work() -> None:
    authenticator = Authenticator(AuthSettings(tokens=[StaticToken(token=PLAIN_TOKEN, user="bob")]))
    assert authenticator.authenticate(f"Bearer {PLAIN_TOKEN}") == Caller("bob")
    assert _refused(authenticator, f"Bearer {token_for('alice')}") == (
        "unauthorized: JWTs are not accepted: no jwt_secret is configured"
    )


# -- the verified-token cache: as strict as a decode --------------------------------------


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens PyJWT decodes (verifies) from now on, in order."""
    seen: list[str] = []
    decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return seen


def test_a_verified_token_is_decoded_once(authenticator: Authenticator, decodes: list[str]) -> None:
    header = f"Bearer {token_for('alice')}"
    for _ in range(3):
        assert authenticator.authenticate(header) == Caller("alice")
    assert len(decodes) == 1


def test_a_cached_token_is_refused_once_expired(authenticator: Authenticator) -> None:
    # A fractional exp is truncated by PyJWT (int(exp) <= now: expired): the cache must not
    # keep the token for the fraction's 0.9 s more.
    while True:
        expires = int(time.time()) + 1
        header = "Bearer " + _jwt({"username": "alice", "exp": expires + 0.9})
        try:
            assert authenticator.authenticate(header) == Caller("alice")
            break
        except ApiError:  # the second turned over between the two lines: once more
            continue
    assert authenticator.authenticate(header) == Caller("alice")  # from the cache
    time.sleep(max(0.0, expires - time.time()) + 0.01)
    assert time.time() < expires + 0.9
    assert _refused(authenticator, header) == "unauthorized: token expired"
    assert _refused(authenticator, header) == "unauthorized: token expired"


def test_a_cached_token_is_not_taken_before_its_nbf_or_iat(
    authenticator: Authenticator, decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = int(time.time())
    header = "Bearer " + _jwt({"username": "alice", "iat": now - 10, "nbf": now - 5})
    assert authenticator.authenticate(header) == Caller("alice")
    # The clock goes back before nbf: the cache does not answer, PyJWT decides again.
    monkeypatch.setattr(auth_module, "time", SimpleNamespace(time=lambda: now - 6.0))
    assert authenticator.authenticate(header) == Caller("alice")  # PyJWT's clock is the real one
    assert len(decodes) == 2


def test_a_tampered_token_is_refused_after_the_genuine_one_was_cached(
    authenticator: Authenticator,
) -> None:
    token = token_for("alice")
    assert authenticator.authenticate(f"Bearer {token}") == Caller("alice")
    head, payload, signature = token.split(".")
    forged_payload = jwt.utils.base64url_encode(b'{"username":"alice","admin":true}').decode()
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for forged in (f"{head}.{forged_payload}.{signature}", f"{head}.{payload}.{flipped}"):
        assert _refused(authenticator, f"Bearer {forged}") == "unauthorized: bad token signature"
    assert authenticator.authenticate(f"Bearer {token}") == Caller("alice")


def test_a_refusal_is_never_cached(authenticator: Authenticator, decodes: list[str]) -> None:
    header = "Bearer " + _jwt({"username": "alice"}, secret="another-secret-of-32-bytes-or-more")
    for _ in range(3):
        assert _refused(authenticator, header) == "unauthorized: bad token signature"
    bad_name = "Bearer " + _jwt({"username": "../etc"})
    for _ in range(3):
        assert _refused(authenticator, bad_name) == (
            "unauthorized: username claim is not a valid user name"
        )
    assert len(decodes) == 6


def test_the_cache_is_bounded_and_forgets_the_oldest(
    authenticator: Authenticator, decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_module, "VERIFIED_CACHE_SIZE", 3)
    headers = [f"Bearer {token_for(f'user{number}')}" for number in range(5)]
    for header in headers:
        authenticator.authenticate(header)
    assert len(authenticator._verified) == 3
    for header in headers[2:]:  # the newest three are remembered
        authenticator.authenticate(header)
    assert len(decodes) == 5
    assert authenticator.authenticate(headers[0]) == Caller("user0")  # forgotten: decoded
    assert len(decodes) == 6
    assert len(authenticator._verified) == 3


def test_a_static_token_stays_first(authenticator: Authenticator, decodes: list[str]) -> None:
    for _ in range(2):
        assert authenticator.authenticate(f"Bearer {PLAIN_TOKEN}") == Caller("bob")
    assert decodes == []
    assert not authenticator._verified


# -- the same over HTTP --------------------------------------------------------------------


async def test_refusals_over_http(make_api: Any, newest_restic: str) -> None:
    api = await make_api(newest_restic, extra=STATIC_TOKENS_TOML)
    for header, message in REFUSALS:
        headers = {} if header is None else {"Authorization": header}
        for method, path, body in (
            ("GET", "/backup/1", None),
            ("POST", "/backup", {"id": 1, "path": "x"}),
            ("POST", "/restore/cancel-all", None),
            ("GET", "/backup/repo-destroyed", None),
        ):
            response = await api.client.request(method, API + path, headers=headers, json=body)
            assert response.status == 401, (header, path)
            assert await response.json() == {"code": 401, "message": message, "data": None}


async def test_accepted_over_http(make_api: Any, newest_restic: str) -> None:
    api = await make_api(newest_restic, extra=STATIC_TOKENS_TOML)
    accepted = [
        _jwt({"username": "alice"}, "HS256"),
        _jwt({"username": "alice"}, "HS384"),
        _jwt({"username": "alice"}, "HS512"),
        SCRIPT_TOKEN,
        PLAIN_TOKEN,
    ]
    for token in accepted:
        response = await api.client.get(
            f"{API}/backup/33", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status == 200, token
        assert await response.json() == {
            "code": 4001,
            "message": "err when load backup [ 33 ]: no such record",
            "data": None,
        }


async def test_admin_only_route_over_http(make_api: Any, newest_restic: str) -> None:
    api = await make_api(newest_restic, extra=STATIC_TOKENS_TOML)
    for token in (token_for("alice"), PLAIN_TOKEN):
        response = await api.client.post(
            f"{API}/backup/destroy-repo", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status == 403
        assert await response.json() == {
            "code": 403,
            "message": "forbidden: destroy-repo needs an admin token",
            "data": None,
        }
    response = await api.client.post(f"{API}/backup/destroy-repo")
    assert response.status == 401


async def test_open_routes_need_no_token(make_api: Any, newest_restic: str) -> None:
    api = await make_api(newest_restic)
    for path in (f"{API}/healthz", f"{API}/openapi.json", "/metrics"):
        response = await api.client.get(path)
        assert response.status == 200, path
