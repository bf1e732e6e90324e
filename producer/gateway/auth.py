"""Bearer keys and tenants: each configured key is a tenant, and sees only the jobs it submitted."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException, Request

from shared.settings import Settings


def tenant_of(key: str) -> str:
    """The tenant a key stands for, as stored with its jobs: a hash, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class Auth:
    """Checks ``Authorization: Bearer <key>`` against the configured keys, in constant time."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [key.get_secret_value().encode() for key in settings.gateway_api_keys]

    def tenant(self, request: Request) -> str | None:
        """The caller's tenant, ``None`` when auth is off; raises 401 for a missing or wrong key."""
        if not self._keys:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        candidate = given.strip().encode()
        # Compare against every key, always, so timing says nothing about which prefix matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if scheme.lower() != "bearer" or not matched:
            raise HTTPException(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
        return tenant_of(candidate.decode())
