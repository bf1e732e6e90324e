"""Bearer keys and tenants, and job-scoped read tokens for browsers.

Each configured key is a tenant, and sees only the jobs it submitted. A browser never holds a key:
a backend mints a **read token** for one job with its key (``POST /v1/jobs/{id}/tokens``) and hands
it to the page, which reads that job's events with ``?token=`` (``EventSource`` cannot send headers).
A token names its job, its tenant and its expiry, signed with HMAC-SHA256; nothing is stored. It is
accepted on the events route of its own job only, and never grants anything else.

The signing secret is ``STREAMFLEET_GATEWAY_TOKEN_SECRET``; unset, it is derived from the API keys,
so every gateway with the same keys accepts the same tokens (and tokens die with a key change).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from fastapi import HTTPException, Request

from shared import jsonutil
from shared.settings import Settings

TOKEN_QUERY = "token"
MAX_TOKEN_TTL_S = 3600


def tenant_of(key: str) -> str:
    """The tenant a key stands for, as stored with its jobs: a hash, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Auth:
    """Checks ``Authorization: Bearer <key>`` against the configured keys (in constant time), and
    mints and checks job-scoped read tokens."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [key.get_secret_value().encode() for key in settings.gateway_api_keys]
        secret = settings.gateway_token_secret
        self._secret = (
            secret.get_secret_value().encode()
            if secret is not None
            else hashlib.sha256(b"streamfleet read tokens\0" + b"\0".join(sorted(self._keys))).digest()
        )
        self.token_ttl_s = settings.gateway_token_ttl_seconds

    def tenant(self, request: Request, *, job: str | None = None) -> str | None:
        """The caller's tenant, ``None`` when auth is off; raises 401 for a missing or wrong key.

        :param job: the job this request reads: a read token for it (``?token=``) stands in for a key.
        """
        if not self._keys:
            return None
        header = request.headers.get("authorization")
        token = request.query_params.get(TOKEN_QUERY)
        if header is None and token is not None and job is not None:
            return self._token_tenant(token, job)
        scheme, _, given = (header or "").partition(" ")
        candidate = given.strip().encode()
        # Compare against every key, always, so timing says nothing about which prefix matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if scheme.lower() != "bearer" or not matched:
            raise HTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
        return tenant_of(candidate.decode())

    def mint(self, job: str, tenant: str | None, ttl_s: int) -> tuple[str, int]:
        """A read token for ``job`` of ``tenant``, and when it expires (unix seconds)."""
        expires = int(time.time()) + min(ttl_s, MAX_TOKEN_TTL_S)
        payload = _b64(jsonutil.dumps({"j": job, "t": tenant or "", "e": expires}))
        return f"{payload}.{self._sign(payload)}", expires

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def _token_tenant(self, token: str, job: str) -> str | None:
        refused = HTTPException(401, "invalid or expired read token: ask the backend for a new one")
        payload, _, signature = token.partition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            raise refused
        try:
            claims = jsonutil.loads(_unb64(payload))
        except ValueError:
            raise refused from None
        if not isinstance(claims, dict) or claims.get("j") != job or not isinstance(claims.get("e"), int):
            raise refused  # a token for another job is no token here
        if claims["e"] < time.time():
            raise refused
        tenant = claims.get("t")
        return str(tenant) if tenant else None
