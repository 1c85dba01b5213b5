"""Status page access: a local password (hashed) or the device API key, a signed session cookie.

- The password is set at provisioning by ``appliance web set-password``, which stores a salted
  scrypt hash (stdlib ``hashlib.scrypt``) in ``<data_dir>/web_password`` (mode 0600). A hash put
  in the config (``web.password_hash``, same format) takes precedence, for fleets provisioned
  from configuration management. There is no default password: with neither a password nor a
  device API key, every login is refused and the login page says how to set one.
- The device API key (``sync.api_key``) is accepted as a password too.
- A login gets a session cookie ``<issued>.<nonce>.<hmac>``, HMAC-SHA256 with a per-device random
  secret kept in ``<data_dir>/web_session.key`` (mode 0600); the MAC also covers a fingerprint of
  the current credentials, so changing the password logs every session out.
- Failed logins are limited per client address (``web.login_max_failures`` per minute).
- Comparisons are constant-time; the password is never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import ApplianceSettings

_LOGGER = logging.getLogger(__name__)

PASSWORD_FILE = "web_password"  # noqa: S105 (a file name, not a password)
SECRET_FILE = "web_session.key"  # noqa: S105 (a file name)
COOKIE_NAME = "appliance_session"
MIN_PASSWORD_LENGTH = 8
# scrypt cost: 2**14 x 8 x 1 = 16 MiB, ~50 ms here, a few hundred ms on a Pi: fine for a login.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 2**20
_PREFIX = "scrypt"


class PasswordError(ValueError):
    """A password (or a stored hash) is not acceptable; the message is for the operator."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = _SCRYPT_N, r: int = _SCRYPT_R,
                  p: int = _SCRYPT_P) -> str:
    """``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (base64url), with a fresh 16-byte salt."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM,
                            dklen=32)
    return f"{_PREFIX}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (constant-time on the digest)."""
    try:
        prefix, n, r, p, salt, digest = stored.split("$")
        if prefix != _PREFIX:
            raise ValueError(prefix)
        expected = _unb64(digest)
        actual = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r),
                                p=int(p), maxmem=_SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError) as err:
        _LOGGER.error("stored status page password hash is malformed (%s)", type(err).__name__)
        return False
    return hmac.compare_digest(actual, expected)


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 (create the directory if needed).

    Run as root (``sudo appliance web set-password``), the file is given to the owner of the
    data directory, i.e. the service user, which must be able to read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            owner = path.parent.stat()
            os.fchown(fd, owner.st_uid, owner.st_gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def store_password_hash(data_dir: Path, hashed: str) -> Path:
    path = data_dir / PASSWORD_FILE
    _write_private(path, (hashed + "\n").encode())
    return path


def load_password_hash(settings: ApplianceSettings) -> str | None:
    """The configured hash (web.password_hash) or the one in the data dir, or None."""
    if settings.web.password_hash is not None:
        value = settings.web.password_hash.get_secret_value().strip()
        if value:
            return value
    path = settings.paths.data_dir / PASSWORD_FILE
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as err:  # e.g. written by root, unreadable by the service user
        _LOGGER.error("cannot read the status page password file %s: %s", path, err)
        return None
    return value or None


def load_or_create_secret(data_dir: Path) -> bytes:
    """The per-device cookie signing secret (32 random bytes), created on first use."""
    path = data_dir / SECRET_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    if len(data) >= 32:
        return data
    data = secrets.token_bytes(32)
    _write_private(path, data)
    _LOGGER.info("created the status page session secret in %s", path)
    return data


class RateLimiter:
    """At most ``max_failures`` failures per ``window_s`` per client key (sliding window)."""

    def __init__(self, max_failures: int, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        return times

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again (0 = now)."""
        with self._lock:
            now = self._clock()
            times = self._recent(key, now)
            if len(times) < self.max_failures:
                return 0.0
            return max(0.0, self.window_s - (now - times[0]))

    def failure(self, key: str) -> None:
        with self._lock:
            now = self._clock()
            self._recent(key, now).append(now)
            if len(self._failures) > 10_000:  # bound memory against address spraying
                for stale in [k for k, v in self._failures.items() if not v]:
                    del self._failures[stale]

    def reset(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


@dataclass(frozen=True, slots=True)
class LoginResult:
    ok: bool
    reason: str  # "ok" | "not_configured" | "wrong" | "rate_limited"
    retry_after_s: float = 0.0


class Authenticator:
    """Checks passwords and issues/validates session cookies for one device."""

    def __init__(self, settings: ApplianceSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._secret = load_or_create_secret(settings.paths.data_dir)
        self.limiter = RateLimiter(settings.web.login_max_failures)
        self.ttl_s = settings.web.session_ttl_s

    # --- credentials -----------------------------------------------------------------------------

    def password_hash(self) -> str | None:
        return load_password_hash(self._settings)  # re-read: set-password works without restart

    def _api_key(self) -> str | None:
        key = self._settings.sync.api_key
        value = key.get_secret_value() if key is not None else ""
        return value or None

    def password_set(self) -> bool:
        return self.password_hash() is not None

    def configured(self) -> bool:
        """Whether any credential exists (otherwise logins are refused)."""
        return self.password_set() or self._api_key() is not None

    def check_api_key(self, candidate: str) -> bool:
        key = self._api_key()
        return key is not None and hmac.compare_digest(candidate.encode(), key.encode())

    def check_secret(self, candidate: str) -> bool:
        """The password or the device API key."""
        hashed = self.password_hash()
        ok_password = hashed is not None and verify_password(candidate, hashed)
        return ok_password or self.check_api_key(candidate)

    def login(self, client: str, candidate: str) -> LoginResult:
        wait = self.limiter.retry_after(client)
        if wait > 0:
            _LOGGER.warning("status page login from %s refused: rate limited", client)
            return LoginResult(False, "rate_limited", wait)
        if not self.configured():
            _LOGGER.warning("status page login from %s refused: no password set", client)
            return LoginResult(False, "not_configured")
        if self.check_secret(candidate):
            self.limiter.reset(client)
            _LOGGER.info("status page login from %s", client)
            return LoginResult(True, "ok")
        self.limiter.failure(client)
        _LOGGER.warning("status page login from %s failed", client)
        return LoginResult(False, "wrong")

    # --- sessions --------------------------------------------------------------------------------

    def _fingerprint(self) -> bytes:
        """Changes when the password or the API key changes, which ends existing sessions."""
        material = f"{self.password_hash() or ''}\n{self._api_key() or ''}".encode()
        return hashlib.sha256(material).digest()

    def _mac(self, payload: str) -> str:
        mac = hmac.new(self._secret, payload.encode() + b"|" + self._fingerprint(),
                       hashlib.sha256)
        return _b64(mac.digest())

    def issue_session(self) -> str:
        payload = f"{int(self._clock())}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{self._mac(payload)}"

    def valid_session(self, cookie: str | None) -> bool:
        if not cookie or cookie.count(".") != 2:
            return False
        issued, nonce, mac = cookie.split(".")
        if not hmac.compare_digest(mac.encode(), self._mac(f"{issued}.{nonce}").encode()):
            return False
        try:
            age = self._clock() - int(issued)
        except ValueError:
            return False
        return 0 <= age < self.ttl_s and self.configured()
