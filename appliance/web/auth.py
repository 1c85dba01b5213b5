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
- Login attempts are limited per client address (``web.login_max_failures`` a minute and
  ``web.login_max_failures_hour`` an hour) and for all addresses together
  (``web.login_max_failures_global`` a minute); the attempt is taken before the password is
  checked, so concurrent guesses cannot overrun it. A correct password clears its address.
- ``POST /logout`` revokes the session on the server (``<data_dir>/web_revoked.json``).
- Comparisons are constant-time; the password is never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from appliance.config import ApplianceSettings
from appliance.logging_setup import LogThrottle

_LOGGER = logging.getLogger(__name__)
# A guessing attack must not flood the log: one line per kind and minute, with a count.
_THROTTLE = LogThrottle(60.0)

PASSWORD_FILE = "web_password"  # noqa: S105 (a file name, not a password)
SECRET_FILE = "web_session.key"  # noqa: S105 (a file name)
REVOKED_FILE = "web_revoked.json"
COOKIE_NAME = "appliance_session"
MAX_REVOKED = 10_000  # logged-out sessions remembered until they expire
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


def client_key(address: str | None) -> str:
    """The rate-limit key of a client address: the address itself for IPv4, its /64 network for
    IPv6 (one host holds a whole /64, so counting single IPv6 addresses could be sprayed)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginLimiter:
    """Login attempts allowed per client address (a back-off in steps: ``per_client`` limits,
    e.g. 5 a minute and 20 an hour) and for every address together (``overall``, a ceiling
    against guessing from many addresses), as moving windows of the ``limits`` library.

    :meth:`reserve` checks every limit and takes one attempt from each under one lock, *before*
    the password is checked, so concurrent wrong passwords cannot get more checks than the
    limit allows. A correct password gives the address its attempts back (:meth:`forgive`)."""

    def __init__(self, per_client: Sequence[RateLimitItem],
                 overall: Sequence[RateLimitItem]) -> None:
        self._windows = MovingWindowRateLimiter(MemoryStorage())
        self._per_client = list(per_client)
        self._overall = list(overall)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ApplianceSettings) -> LoginLimiter:
        web = settings.web
        return cls([RateLimitItemPerMinute(web.login_max_failures),
                    RateLimitItemPerHour(web.login_max_failures_hour)],
                   [RateLimitItemPerMinute(web.login_max_failures_global)])

    def _limits(self, key: str) -> list[tuple[RateLimitItem, tuple[str, ...]]]:
        return ([(item, ("client", key)) for item in self._per_client]
                + [(item, ("all",)) for item in self._overall])

    def reserve(self, key: str) -> float:
        """Take one attempt for ``key``: 0.0 when granted, else the seconds to wait (nothing
        taken)."""
        limits = self._limits(key)
        with self._lock:
            waits = [self._windows.get_window_stats(item, *ids).reset_time - time.time()
                     for item, ids in limits if not self._windows.test(item, *ids)]
            if waits:
                return max(1.0, max(waits))
            for item, ids in limits:
                self._windows.hit(item, *ids)
        return 0.0

    def forgive(self, key: str) -> None:
        """The address proved it knows the password: clear its own counts."""
        with self._lock:
            for item in self._per_client:
                self._windows.clear(item, "client", key)


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
        self.limiter = LoginLimiter.from_settings(settings)
        self.ttl_s = settings.web.session_ttl_s
        self._revoked_path = settings.paths.data_dir / REVOKED_FILE
        self._revoked_lock = threading.Lock()
        self._revoked = self._load_revoked()

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
        """Check ``candidate`` for the client address ``client`` (rate limited)."""
        if not self.configured():
            _LOGGER.warning("status page login from %s refused: no password set", client)
            return LoginResult(False, "not_configured")
        key = client_key(client)
        wait = self.limiter.reserve(key)  # before the ~50 ms scrypt: atomic check-and-take
        if wait > 0:
            _THROTTLE.log(_LOGGER, logging.WARNING, "rate-limited",
                          "status page login from %s refused: rate limited", client)
            return LoginResult(False, "rate_limited", wait)
        if self.check_secret(candidate):
            self.limiter.forgive(key)
            _LOGGER.info("status page login from %s", client)
            return LoginResult(True, "ok")
        _THROTTLE.log(_LOGGER, logging.WARNING, "wrong",
                      "status page login from %s failed", client)
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

    def _parse(self, cookie: str | None) -> tuple[int, str] | None:
        """(issued, nonce) of a cookie with a good MAC, unexpired; else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        issued, nonce, mac = cookie.split(".")
        if not hmac.compare_digest(mac.encode(), self._mac(f"{issued}.{nonce}").encode()):
            return None
        try:
            issued_s = int(issued)
        except ValueError:
            return None
        age = self._clock() - issued_s
        return (issued_s, nonce) if 0 <= age < self.ttl_s else None

    def valid_session(self, cookie: str | None) -> bool:
        parsed = self._parse(cookie)
        if parsed is None or not self.configured():
            return False
        with self._revoked_lock:
            return parsed[1] not in self._revoked

    def revoke(self, cookie: str | None) -> bool:
        """Log a session out on the server: its cookie is refused from now on, also after a
        restart (the revoked nonces are kept in ``<data_dir>/web_revoked.json`` until they
        would have expired anyway)."""
        parsed = self._parse(cookie)
        if parsed is None:
            return False
        issued, nonce = parsed
        with self._revoked_lock:
            now = self._clock()
            self._revoked = {n: exp for n, exp in self._revoked.items() if exp > now}
            self._revoked[nonce] = issued + self.ttl_s
            if len(self._revoked) > MAX_REVOKED:  # keep the newest; older ones expire first
                newest = sorted(self._revoked.items(), key=lambda kv: kv[1])[-MAX_REVOKED:]
                self._revoked = dict(newest)
            try:
                _write_private(self._revoked_path, json.dumps(self._revoked).encode())
            except OSError as err:  # still revoked in memory until a restart
                _LOGGER.error("cannot save the logged-out sessions to %s: %s",
                              self._revoked_path, err)
        return True

    def _load_revoked(self) -> dict[str, float]:
        try:
            data = json.loads(self._revoked_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            _LOGGER.error("cannot read the logged-out sessions in %s: %s", self._revoked_path,
                          err)
            return {}
        now = self._clock()
        if not isinstance(data, dict):
            return {}
        return {str(n): float(exp) for n, exp in data.items()
                if isinstance(exp, int | float) and exp > now}
