"""Secrets: random 32-byte keys, stored as sha256 hex digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

DEVICE_PREFIX = "dk_"
ADMIN_PREFIX = "at_"


def new_secret(prefix: str) -> str:
    """A fresh key: prefix + 32 random bytes, URL-safe base64 (shown once, never stored)."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    # Keys are 256-bit random values, so a fast unsalted hash is enough: no dictionary to try.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
