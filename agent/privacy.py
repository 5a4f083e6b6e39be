"""Pseudonymized user names: a keyed HMAC, stable per user, in everything the agent sends.

Employee monitoring is regulated in many places (works councils, GDPR's data minimisation):
with `privacy.pseudonymize: true` the SIEM sees `u-3f9a0c2e71b4d815` instead of `alice`, and
only whoever holds the key (`state_dir/pseudonym.key`, 0600, made at the first start) can say
who that is (`exfilwatch pseudonym reveal u-...`, which tries every user of the host and of the
watchlist). The same user has the same pseudonym in every record and across restarts, so
correlation in the SIEM still works.

What is replaced: `user.name`, `user.id`, the login user and uid of the attribution, and the
`user` of health records (watchlist windows). What is not: paths and command lines that
contain a name (`/home/alice/...`); say so to whoever reviews the deployment."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from typing import Any

from msgspec.structs import replace as evolve

from agent.events import Event

KEY_FILE = "pseudonym.key"
PREFIX = "u-"
_CACHE = 4096


def load_or_make_key(path: str) -> bytes:
    """The key (32 random bytes, hex, one line); made 0600 when missing. A key others can read
    is refused: anyone with it can reverse every pseudonym."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
    st = os.stat(path, follow_symlinks=False)
    if st.st_mode & 0o077:
        raise PermissionError(f"{path} has mode {st.st_mode & 0o777:04o}; it must be 0600")
    with open(path, encoding="ascii") as fh:
        text = fh.readline().strip()
    key = bytes.fromhex(text)
    if len(key) < 16:
        raise ValueError(f"{path}: the key is too short")
    return key


class Pseudonyms:
    """name -> pseudonym, with a bounded cache (the same few users, millions of events)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._cache: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        got = self._cache.get(name)
        if got is None:
            digest = hmac.new(self._key, name.encode("utf-8", "surrogateescape"), hashlib.sha256)
            got = PREFIX + digest.hexdigest()[:16]
            if len(self._cache) >= _CACHE:
                self._cache.clear()
            self._cache[name] = got
        return got

    def event(self, e: Event) -> Event:
        if (
            e.user_name is None
            and e.user_id is None
            and e.user_login_name is None
            and e.user_login_id is None
        ):
            return e
        return evolve(
            e,
            user_name=self._maybe(e.user_name),
            user_id=self._maybe(e.user_id),
            user_login_name=self._maybe(e.user_login_name),
            user_login_id=self._maybe(e.user_login_id),
        )

    def record(self, rec: dict[str, Any]) -> dict[str, Any]:
        """An alert or health record, changed in place (and returned)."""
        user = rec.get("user")
        if isinstance(user, dict):
            for k in ("name", "id"):
                if isinstance(user.get(k), str):
                    user[k] = self(user[k])
        custom = rec.get("exfilwatch")
        if isinstance(custom, dict):
            attribution = custom.get("attribution")
            if isinstance(attribution, dict):
                for k in ("login_user", "login_uid"):
                    if isinstance(attribution.get(k), str):
                        attribution[k] = self(attribution[k])
            health = custom.get("health")
            if isinstance(health, dict) and isinstance(health.get("user"), str):
                health["user"] = self(health["user"])
        return rec

    def reveal(self, pseudonym: str, candidates: Iterable[str]) -> list[str]:
        """The candidates whose pseudonym this is (one, unless the key changed)."""
        return sorted({c for c in candidates if hmac.compare_digest(self(c), pseudonym)})

    def _maybe(self, value: str | None) -> str | None:
        return self(value) if value is not None else None
