"""Bearer API keys for the ingress: from env vars and/or a secret file, only their hashes kept in memory.

    keys = KeyStore.from_sources(env_var="DETAILFLOW_API_KEYS", revoked_env_var="DETAILFLOW_API_KEYS_REVOKED",
                                 path="/var/run/secrets/detailflow/api-keys")
    keys.check("Bearer abc...")     # -> ("ok", key_id) | ("missing" | "invalid" | "revoked", key_id | None)
    new_key_file(path)              # writes a file with one fresh key (mode 600), returns the key

Secret file format, one entry per line (blank lines and `# comments` ignored):
    dfk_2Jx...                      an active key
    sha256:9f86d08...               an active key given by its sha256 (the file then holds no secret)
    revoked dfk_2Jx...              a revoked key (403), also as `revoked sha256:...`
    dfk_9Qa... rate=2 burst=4 quota=500   an active key with its own limits: requests/s, bucket size,
                                    images per UTC day (limits.py; unset = the app's defaults)
The file is re-read when it changes (checked at most every `reload_s`), so keys are added or revoked
without a restart. Keys are never logged or shown: logs and responses name a key by `key_id`, the
first 8 hex digits of its sha256.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from pathlib import Path

KEY_PREFIX = "dfk_"
OK, MISSING, INVALID, REVOKED = "ok", "missing", "invalid", "revoked"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def key_id(key_or_hash: str) -> str:
    h = key_or_hash[7:] if key_or_hash.startswith("sha256:") else key_hash(key_or_hash)
    return h[:8]


def _entry_hash(entry: str) -> str:
    entry = entry.strip()
    if entry.startswith("sha256:"):
        digest = entry[7:].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"malformed sha256 key entry (key id {digest[:8]})")
        return digest
    return key_hash(entry)


LIMIT_FIELDS = {"rate": float, "burst": int, "quota": int}


def _split_line(raw: str) -> tuple[bool, str, dict] | None:
    """(revoked, key entry, {limit: value}) of one key-file line; None for blank / comment lines."""
    words = raw.split("#", 1)[0].split()
    if not words:
        return None
    revoked = words[0].lower() == "revoked" and len(words) > 1
    words = words[1:] if revoked else words
    limits = {}
    for opt in words[1:]:
        name, _, value = opt.partition("=")
        if name not in LIMIT_FIELDS or not value:
            raise ValueError(f"key id {key_id(words[0])}: unknown option {name!r} (known: rate=, burst=, "
                             "quota=)")
        try:
            limits[name] = LIMIT_FIELDS[name](value)
        except ValueError as exc:
            raise ValueError(f"key id {key_id(words[0])}: {name} must be a number") from exc
    return revoked, words[0], limits


def parse_entries(lines) -> tuple[set[str], set[str]]:
    """(active hashes, revoked hashes) from key-file lines."""
    active, revoked = set(), set()
    for raw in lines:
        if (parsed := _split_line(raw)) is not None:
            (revoked if parsed[0] else active).add(_entry_hash(parsed[1]))
    return active - revoked, revoked


def parse_limits(lines) -> dict[str, dict]:
    """{key id: {rate, burst, quota} given on its line} from key-file lines."""
    out = {}
    for raw in lines:
        if (parsed := _split_line(raw)) is not None and parsed[2] and not parsed[0]:
            out[_entry_hash(parsed[1])[:8]] = parsed[2]
    return out


class KeyStore:
    """Active and revoked key hashes from env vars + an optional file (reloaded on change)."""

    def __init__(self, env_active: set[str], env_revoked: set[str], path: str | None = None,
                 reload_s: float = 2.0):
        self._env_active, self._env_revoked = env_active, env_revoked
        self.path = Path(path) if path else None
        self.reload_s = reload_s
        self._file_active: set[str] = set()
        self._file_revoked: set[str] = set()
        self.limits: dict[str, dict] = {}  # key id -> limits from the key file (rate, burst, quota)
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._reload(force=True)

    @classmethod
    def from_sources(cls, env_var: str = "", revoked_env_var: str = "", path: str = "",
                     environ=None, reload_s: float = 2.0) -> KeyStore:
        env = os.environ if environ is None else environ
        split = lambda name: [k for k in (env.get(name, "") if name else "").split(",") if k.strip()]
        active, revoked = parse_entries(split(env_var)), parse_entries(split(revoked_env_var))
        env_revoked = revoked[0] | revoked[1] | active[1]
        return cls(active[0] - env_revoked, env_revoked, path or env.get("DETAILFLOW_API_KEYS_FILE") or None,
                   reload_s)

    def __repr__(self) -> str:  # never the keys, not even their hashes
        return f"KeyStore(active={self.count()}, file={self.path})"

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.reload_s:
            return
        with self._lock:
            self._checked = now
            if self.path is None:
                return
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp == self._stamp and not force:
                return
            self._stamp = stamp
            if stamp is None:
                self._file_active, self._file_revoked, self.limits = set(), set(), {}
                return
            lines = self.path.read_text().splitlines()
            self._file_active, self._file_revoked = parse_entries(lines)
            self.limits = parse_limits(lines)

    @property
    def revoked(self) -> set[str]:
        return self._env_revoked | self._file_revoked

    @property
    def active(self) -> set[str]:
        return (self._env_active | self._file_active) - self.revoked

    def count(self) -> int:
        self._reload()
        return len(self.active)

    def check(self, authorization: str | None) -> tuple[str, str | None]:
        """Classify an Authorization header value: ok / missing / invalid / revoked (+ key id)."""
        self._reload()
        if not authorization or not authorization.strip():
            return MISSING, None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return INVALID, None
        h = key_hash(token)
        if h in self.revoked:
            return REVOKED, h[:8]
        if h in self.active:
            return OK, h[:8]
        return INVALID, h[:8]


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def new_key_file(path: str | os.PathLike) -> str:
    """Create `path` (mode 600) holding one fresh key; returns the key. Refuses to overwrite."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# detailflow API keys: one per line; `revoked <key>` to revoke (see serving/auth.py)\n")
        f.write(key + "\n")
    return key


def first_key(path: str | os.PathLike) -> str | None:
    """The first active plain key in a key file (for local clients), or None."""
    path = Path(path)
    if not path.is_file():
        return None
    revoked = parse_entries(path.read_text().splitlines())[1]
    for raw in path.read_text().splitlines():
        parsed = _split_line(raw)
        if parsed and not parsed[0] and not parsed[1].startswith("sha256:") \
                and key_hash(parsed[1]) not in revoked:
            return parsed[1]
    return None
