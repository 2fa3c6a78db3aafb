"""Tokens that survive a restart: one small JSON file per profile in the state directory.

A restart (or a crash loop) within a token's lifetime must make no upstream request, so the
engine saves every new token here and loads it back at start. Persistence is best-effort:
a file that cannot be trusted is ignored with a warning, a failed write is logged, and
neither ever stops the broker from serving.

File ``<state_dir>/<profile>.token.json``, mode 0600, written atomically (temp file in the
same directory, fsync, rename, fsync of the directory)::

    {"format": "colt-broker-token", "version": 1, "profile": "default",
     "binding": "<sha256 of client_id + newline + token_url>", "access_token": "...",
     "token_type": "Bearer", "obtained_at_wall": ..., "expires_at_wall": ...,
     "saved_at_wall": ...}

The binding ties the token to the credentials that obtained it without storing the secret:
a token saved for another client id or endpoint is never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

import structlog

from broker._clock import SYSTEM_CLOCK, Clock
from broker._profile import ProfileConfig
from broker._token import Token

__all__ = ["TokenStore", "binding"]

FORMAT = "colt-broker-token"
VERSION = 1
MIN_REMAINING = 1.0  # seconds: a token closer to expiry than this is not worth loading
_MAX_FILE_SIZE = 64 * 1024  # a token file is well under 4 KiB; more is not ours
_DIR_MODE = 0o700
_FILE_MODE = 0o600
# Profile names become file names: nothing that could leave the directory or hide a file.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

log = structlog.get_logger()


class _Ignored(Exception):
    """A state file that exists but cannot be trusted; the message is the reason."""


def binding(profile: ProfileConfig) -> str:
    """What ties a saved token to the credentials that obtained it (never the secret)."""
    return hashlib.sha256(f"{profile.client_id}\n{profile.token_url}".encode()).hexdigest()


class TokenStore:
    """Saves and loads each profile's current token in ``state_dir``. Synchronous, never raises.

    The engine calls it from a worker thread; concurrent saves of different profiles are
    safe, and concurrent saves of one profile leave one complete file (the last rename wins).
    """

    def __init__(self, state_dir: Path, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.state_dir = Path(state_dir)
        self._clock = clock

    def path(self, profile_name: str) -> Path:
        """The file that holds ``profile_name``'s token."""
        return self.state_dir / f"{profile_name}.token.json"

    def load(self, profile: ProfileConfig) -> Token | None:
        """The saved token of ``profile`` if it was obtained with the same client id and
        token URL and expires more than a second from now; None otherwise."""
        path = self.path(profile.name)
        try:
            record = _read_record(path, profile)
        except FileNotFoundError:
            return None
        except (_Ignored, OSError) as exc:
            log.warning("state.ignored", profile=profile.name, path=str(path), reason=_why(exc))
            return None
        return self._to_token(profile.name, record)

    def save(self, profile: ProfileConfig, token: Token) -> None:
        """Write ``token`` as ``profile``'s current one, atomically; log and return on failure."""
        path = self.path(profile.name)
        try:
            _check_name(profile.name)
            data = _encode(self._record(profile, token))
            self._ensure_dir()
            _write_atomically(path, data)
        except (OSError, ValueError, _Ignored) as exc:
            log.warning("state.save_failed", profile=profile.name, path=str(path), error=_why(exc))
            return
        log.debug("state.saved", profile=profile.name, token=token.fingerprint)

    def forget(self, profile_name: str) -> None:
        """Delete ``profile_name``'s saved token, if any (for example, credentials changed)."""
        path = self.path(profile_name)
        try:
            _check_name(profile_name)
            path.unlink(missing_ok=True)
        except (OSError, _Ignored) as exc:
            log.warning(
                "state.forget_failed", profile=profile_name, path=str(path), error=_why(exc)
            )

    def _record(self, profile: ProfileConfig, token: Token) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "profile": profile.name,
            "binding": binding(profile),
            "access_token": token.access_token,
            "token_type": token.token_type,
            "obtained_at_wall": token.wall_expires_at - token.lifetime,
            "expires_at_wall": token.wall_expires_at,
            "saved_at_wall": self._clock.wall(),
        }

    def _to_token(self, profile_name: str, record: dict[str, Any]) -> Token | None:
        # Wall deadlines become monotonic ones by their distance from now. A wall-clock jump
        # while the daemon was down shifts the result; that is accepted: the engine keeps
        # min_valid of headroom, and a consumer that meets a 401 reports it for a refresh.
        now_mono, now_wall = self._clock.monotonic(), self._clock.wall()
        remaining = record["expires_at_wall"] - now_wall
        if remaining <= MIN_REMAINING:
            log.info("state.expired", profile=profile_name, expired_ago=round(-remaining, 1))
            return None
        token = Token(
            access_token=record["access_token"],
            token_type=record["token_type"],
            obtained_at=now_mono + (record["obtained_at_wall"] - now_wall),
            expires_at=now_mono + remaining,
            wall_expires_at=record["expires_at_wall"],
        )
        log.info(
            "state.loaded",
            profile=profile_name,
            token=token.fingerprint,
            expires_in=round(remaining),
        )
        return token

    def _ensure_dir(self) -> None:
        _make_dirs(self.state_dir)
        mode = stat.S_IMODE(self.state_dir.stat().st_mode)
        if mode & 0o077:
            os.chmod(self.state_dir, _DIR_MODE)
            log.info("state.dir_tightened", path=str(self.state_dir), was=f"{mode:04o}", now="0700")


def _read_record(path: Path, profile: ProfileConfig) -> dict[str, Any]:
    """The checked contents of ``path``. Raises _Ignored, or OSError (FileNotFoundError)."""
    _check_name(profile.name)
    record = _decode(_read_own_file(path))
    _check_record(record, profile)
    return record


def _read_own_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # NONBLOCK: a FIFO won't hang
    try:
        _check_file(os.fstat(fd))
        return _read_limited(fd)
    finally:
        os.close(fd)


def _check_file(info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise _Ignored("not a regular file")
    if info.st_uid != os.geteuid():
        raise _Ignored(f"owned by uid {info.st_uid}, not by this process's uid")


def _read_limited(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, _MAX_FILE_SIZE + 1 - len(data)):
        data += chunk
        if len(data) > _MAX_FILE_SIZE:
            raise _Ignored(f"larger than {_MAX_FILE_SIZE} bytes")
    return data


def _decode(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        # The parser's message quotes no content, only a position.
        raise _Ignored(f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise _Ignored(f"not a JSON object but a {type(record).__name__}")
    return record


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid number here")


def _check_record(record: dict[str, Any], profile: ProfileConfig) -> None:
    if record.get("format") != FORMAT:
        raise _Ignored(f"format is not {FORMAT!r}")
    if record.get("version") != VERSION:
        raise _Ignored(f"unsupported version {record.get('version')!r} (expected {VERSION})")
    if record.get("profile") != profile.name:
        raise _Ignored("saved for another profile")
    if record.get("binding") != binding(profile):
        raise _Ignored("saved for another client_id or token_url")
    for key in ("access_token", "token_type"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise _Ignored(f"{key} missing or not a non-empty string")
    for key in ("obtained_at_wall", "expires_at_wall"):
        if not _is_number(record.get(key)):
            raise _Ignored(f"{key} missing or not a number")
    if record["expires_at_wall"] <= record["obtained_at_wall"]:
        raise _Ignored("expires_at_wall is not after obtained_at_wall")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_name(profile_name: str) -> None:
    if not _SAFE_NAME.fullmatch(profile_name):
        raise _Ignored(f"profile name {profile_name!r} is not usable as a file name")


def _encode(record: dict[str, Any]) -> bytes:
    # allow_nan=False: a NaN deadline raises here (ValueError) instead of being written.
    return json.dumps(record, allow_nan=False, indent=1).encode() + b"\n"


def _make_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700 (``Path.mkdir`` would give
    the parents the umask's default)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another thread or process was first
            os.mkdir(directory, _DIR_MODE)


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable: without this a power cut can lose the new directory entry."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(exc: BaseException) -> str:
    """A short reason for a log line: the OS error text, without repeating the path."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return str(exc)
