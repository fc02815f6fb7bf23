"""Who is calling: a JWT (HS256/384/512) naming `username`, or a static token from config."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from fa_restic.api.errors import unauthorized
from fa_restic.config import USERNAME_REGEX, AuthSettings
from fa_restic.jobs.service import Caller

log = logging.getLogger("fa_restic.api")

JWT_ALGORITHMS = ["HS256", "HS384", "HS512"]
MINIMUM_SECRET_BYTES = 32
VERIFIED_CACHE_SIZE = 4096
USERNAME_PATTERN = re.compile(USERNAME_REGEX)


def valid_username(name: object) -> bool:
    """True for a name that is safe as a folder name and a restic tag (no commas, no slashes)."""
    return isinstance(name, str) and USERNAME_PATTERN.fullmatch(name) is not None


@dataclass(frozen=True)
class _Verified:
    """A JWT that verified: who it names and the times PyJWT checked it against.

    PyJWT refuses a token at `now` if int(exp) <= now, or int(iat) or int(nbf) > now;
    `not_before <= now < expires` says the same (infinite for a claim the token lacks)."""

    caller: Caller
    not_before: float
    expires: float

    @classmethod
    def of(cls, caller: Caller, claims: dict[str, Any]) -> _Verified:
        # PyJWT has checked each present claim converts with int() (else the token failed).
        starts = [int(claims[name]) for name in ("iat", "nbf") if name in claims]
        expires = int(claims["exp"]) if "exp" in claims else math.inf
        return cls(caller, max(starts, default=-math.inf), expires)


@dataclass(frozen=True)
class _StaticToken:
    sha256: bytes
    caller: Caller


class Authenticator:
    """Turns an Authorization header into a Caller, or raises a 401 ApiError."""

    def __init__(self, settings: AuthSettings) -> None:
        self._secret = settings.jwt_secret
        if self._secret is not None:
            if len(self._secret.encode()) < MINIMUM_SECRET_BYTES:
                log.warning(
                    "auth.jwt_secret is shorter than %d bytes: use a long random secret",
                    MINIMUM_SECRET_BYTES,
                )
            # Said once here if it matters; PyJWT warns on every request whose key is shorter
            # than its hash (64 bytes for HS512), which a warnings-as-errors run turns into a 500.
            warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
        self._verified: dict[str, _Verified] = {}
        """Authorization headers whose JWT verified, oldest first (VERIFIED_CACHE_SIZE)."""
        self._tokens = [
            _StaticToken(
                bytes.fromhex(entry.token_sha256)
                if entry.token_sha256
                else hashlib.sha256((entry.token or "").encode()).digest(),
                Caller(entry.user, entry.admin),
            )
            for entry in settings.tokens
        ]

    def authenticate(self, header: str | None) -> Caller:
        """Returns the caller the header names; raises ApiError (401) with the reason."""
        if not header:
            raise unauthorized("missing Authorization header")
        # Verifying a JWT costs more than the rest of a status request; clients poll with
        # the same token, so a header whose JWT verified is remembered, with the times it
        # holds, and checked against the clock again on every request. Only a JWT that
        # verified is remembered (a static token is not: it is found before any JWT).
        verified = self._verified.get(header)
        if verified is not None:
            if verified.not_before <= time.time() < verified.expires:
                return verified.caller
            del self._verified[header]  # expired (or the clock went back): decode to say so
        if not header.isascii():
            # aiohttp hands bytes that are not UTF-8 on as lone surrogates (surrogateescape).
            try:
                header.encode("utf-8")
            except UnicodeEncodeError:
                raise unauthorized("the Authorization header is not text") from None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("expected 'Authorization: Bearer <token>'")
        digest = hashlib.sha256(token.encode()).digest()
        for entry in self._tokens:
            if hmac.compare_digest(entry.sha256, digest):
                return entry.caller
        if token.count(".") != 2:
            raise unauthorized("unknown token")
        if not self._secret:
            raise unauthorized("JWTs are not accepted: no jwt_secret is configured")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=JWT_ALGORITHMS,
                options={"require": ["username"]},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("token expired") from None
        except jwt.InvalidSignatureError:
            raise unauthorized("bad token signature") from None
        except jwt.InvalidAlgorithmError:
            raise unauthorized("token algorithm not allowed (HS256, HS384, HS512)") from None
        except jwt.MissingRequiredClaimError:
            raise unauthorized("token has no username claim") from None
        except jwt.PyJWTError as error:
            raise unauthorized(f"invalid token ({type(error).__name__})") from None
        username = claims["username"]
        if not valid_username(username):
            raise unauthorized("username claim is not a valid user name")
        caller = Caller(username, claims.get("admin") is True)
        while len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[header] = _Verified.of(caller, claims)
        return caller
