"""TokenStore: tokens survive a restart, untrusted files are ignored, writes are atomic and 0600."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from _clocks import FakeClock
from structlog.testing import capture_logs
from structlog.typing import EventDict

from broker._persist import TokenStore, binding
from broker._profile import ProfileConfig, Secret
from broker._token import Token

START_WALL = 1_700_000_000.0
LIFETIME = 1800.0
SECRET = "made-up-secret-for-tests"  # not a credential: a marker to look for
# A made-up JWT-shaped token: {"alg":"HS256","typ":"JWT"} . {"sub":"demo"} . signature
TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJkZW1vIn0."
    "c2lnbmF0dXJlLW5vdC1yZWFsLWp1c3QtZm9yLXRlc3Rz"
)


PROFILE = ProfileConfig(
    name="default",
    client_id="client-a",
    secret=Secret(SECRET, "test"),
    token_url="https://auth.example.test/oauth/token",
)


def make_token(clock: FakeClock, access_token: str = TOKEN) -> Token:
    """A token obtained at the clock's present, valid for LIFETIME seconds."""
    return Token(
        access_token=access_token,
        token_type="Bearer",
        obtained_at=clock.mono,
        expires_at=clock.mono + LIFETIME,
        wall_expires_at=clock.now + LIFETIME,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(mono=100.0, now=START_WALL)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "colt-broker"


@pytest.fixture
def store(state_dir: Path, clock: FakeClock) -> TokenStore:
    return TokenStore(state_dir, clock=clock)


@pytest.fixture
def events() -> Iterator[list[EventDict]]:
    """Every structlog event of the test, checked afterwards never to hold the whole token."""
    with capture_logs() as captured:
        yield captured
    for event in captured:
        assert TOKEN not in repr(event), f"a whole token was logged: {event['event']}"
        assert SECRET not in repr(event), f"the secret was logged: {event['event']}"


def restarted(state_dir: Path, clock: FakeClock, after: float) -> tuple[TokenStore, FakeClock]:
    """A new store, as after a restart ``after`` seconds later: same wall clock, new monotonic."""
    later = FakeClock(mono=7.0, now=clock.now + after)
    return TokenStore(state_dir, clock=later), later


def named(events: list[EventDict], name: str) -> list[EventDict]:
    return [e for e in events if e["event"] == name]


def warnings(events: list[EventDict]) -> list[EventDict]:
    return [e for e in events if e["log_level"] in {"warning", "error", "critical"}]


# -- round trip --------------------------------------------------------------------------


def test_round_trip_after_restart_keeps_the_remaining_time(
    store: TokenStore, state_dir: Path, clock: FakeClock, events: list[EventDict]
) -> None:
    """A token saved then loaded after a restart is the same token with the right time left."""
    store.save(PROFILE, make_token(clock))
    new_store, later = restarted(state_dir, clock, after=600.0)
    token = new_store.load(PROFILE)
    assert token is not None
    assert (token.access_token, token.token_type) == (TOKEN, "Bearer")
    assert token.remaining(later.monotonic()) == pytest.approx(LIFETIME - 600.0)
    assert token.lifetime == pytest.approx(LIFETIME)
    assert token.obtained_at == pytest.approx(later.monotonic() - 600.0)
    assert token.wall_expires_at == pytest.approx(START_WALL + LIFETIME)
    assert warnings(events) == []
    assert named(events, "state.loaded")[0]["token"] == token.fingerprint


def test_the_latest_save_wins(store: TokenStore, clock: FakeClock) -> None:
    """Saving a newer token replaces the older one."""
    store.save(PROFILE, make_token(clock))
    clock.advance(1500.0)
    store.save(PROFILE, make_token(clock, access_token="second-token-abcdef"))
    token = store.load(PROFILE)
    assert token is not None
    assert token.access_token == "second-token-abcdef"
    assert token.remaining(clock.monotonic()) == pytest.approx(LIFETIME)


def test_file_holds_the_documented_fields_and_no_secret(
    store: TokenStore, state_dir: Path, clock: FakeClock
) -> None:
    """The file has the documented format, a binding instead of the secret, and wall times."""
    store.save(PROFILE, make_token(clock))
    raw = (state_dir / "default.token.json").read_text()
    assert SECRET not in raw
    assert json.loads(raw) == {
        "format": "colt-broker-token",
        "version": 1,
        "profile": "default",
        "binding": binding(PROFILE),
        "access_token": TOKEN,
        "token_type": "Bearer",
        "obtained_at_wall": START_WALL,
        "expires_at_wall": START_WALL + LIFETIME,
        "saved_at_wall": START_WALL,
    }


def test_missing_file_is_quietly_none(store: TokenStore, events: list[EventDict]) -> None:
    """With nothing saved yet, load returns None without a warning."""
    assert store.load(PROFILE) is None
    assert warnings(events) == []


# -- what is not loaded ------------------------------------------------------------------


@pytest.mark.parametrize("after", [LIFETIME - 1.0, LIFETIME - 0.5, LIFETIME, LIFETIME + 3600])
def test_expired_or_nearly_expired_token_is_not_loaded(
    store: TokenStore, state_dir: Path, clock: FakeClock, after: float
) -> None:
    """A token with 1 s or less left (or already expired) at load time is not returned."""
    store.save(PROFILE, make_token(clock))
    new_store, _ = restarted(state_dir, clock, after=after)
    assert new_store.load(PROFILE) is None


def test_token_with_just_over_a_second_left_is_loaded(
    store: TokenStore, state_dir: Path, clock: FakeClock
) -> None:
    """The 1 s margin is the only one: 1.5 s left is still a token."""
    store.save(PROFILE, make_token(clock))
    new_store, _ = restarted(state_dir, clock, after=LIFETIME - 1.5)
    assert new_store.load(PROFILE) is not None


@pytest.mark.parametrize(
    "changed",
    [
        replace(PROFILE, client_id="client-b"),
        replace(PROFILE, token_url="https://sandbox.example.test/oauth/token"),
    ],
    ids=["client_id", "token_url"],
)
def test_token_of_other_credentials_is_ignored(
    store: TokenStore, clock: FakeClock, events: list[EventDict], changed: ProfileConfig
) -> None:
    """A token obtained with another client_id or token_url is never loaded."""
    store.save(PROFILE, make_token(clock))
    assert store.load(changed) is None
    [warning] = named(events, "state.ignored")
    assert "client_id or token_url" in warning["reason"]


def test_changed_secret_alone_keeps_the_token(store: TokenStore, clock: FakeClock) -> None:
    """The binding leaves the secret out: a rotated secret does not discard a valid token."""
    store.save(PROFILE, make_token(clock))
    assert store.load(replace(PROFILE, secret=Secret("another-made-up", "test"))) is not None


def test_file_of_another_profile_is_ignored(
    store: TokenStore, state_dir: Path, clock: FakeClock, events: list[EventDict]
) -> None:
    """A file copied or renamed from another profile is not trusted."""
    store.save(PROFILE, make_token(clock))
    other = replace(PROFILE, name="other")
    (state_dir / "default.token.json").rename(state_dir / "other.token.json")
    assert store.load(other) is None
    assert "another profile" in named(events, "state.ignored")[0]["reason"]


def _record(**changes: Any) -> bytes:
    record: dict[str, Any] = {
        "format": "colt-broker-token",
        "version": 1,
        "profile": "default",
        "binding": binding(PROFILE),
        "access_token": TOKEN,
        "token_type": "Bearer",
        "obtained_at_wall": START_WALL,
        "expires_at_wall": START_WALL + LIFETIME,
        "saved_at_wall": START_WALL,
    }
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not None}).encode()


def _write(content: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(content)


BAD_FILES: dict[str, tuple[Callable[[Path], object], str]] = {
    "corrupt-json": (_write(_record()[:-7]), "not valid JSON"),
    "empty": (_write(b""), "not valid JSON"),
    "binary-garbage": (_write(bytes(range(256)) * 4), "not valid JSON"),
    "json-list": (_write(b'["access_token", "x"]'), "not a JSON object"),
    "wrong-format": (_write(_record(format="vault-sink")), "format"),
    "wrong-version": (_write(_record(version=2)), "unsupported version 2"),
    "missing-token": (_write(_record(access_token=None)), "access_token"),
    "number-as-text": (_write(_record(expires_at_wall="soon")), "expires_at_wall"),
    "nan": (_write(_record().replace(b"1700001800.0", b"NaN")), "not valid JSON"),
    "backwards": (_write(_record(obtained_at_wall=START_WALL + 9999)), "not after"),
    "directory": (lambda path: path.mkdir(), "not a regular file"),
    "fifo": (os.mkfifo, "not a regular file"),
    "huge": (_write(b" " * 70_000 + _record()), "larger than"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_untrusted_file_is_ignored_with_a_warning(
    store: TokenStore, state_dir: Path, events: list[EventDict], case: str
) -> None:
    """Anything but a good token file gives None and a state.ignored warning, never an error."""
    make, reason = BAD_FILES[case]
    state_dir.mkdir(parents=True)
    path = state_dir / "default.token.json"
    make(path)
    assert store.load(PROFILE) is None
    [warning] = warnings(events)
    assert (warning["event"], warning["log_level"]) == ("state.ignored", "warning")
    assert warning["path"] == str(path)
    assert reason in warning["reason"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_file_owned_by_someone_else_is_ignored(
    store: TokenStore, state_dir: Path, clock: FakeClock, events: list[EventDict]
) -> None:
    """A token file another user owns is not trusted."""
    store.save(PROFILE, make_token(clock))
    os.chown(state_dir / "default.token.json", 65534, 65534)
    assert store.load(PROFILE) is None
    assert "owned by uid 65534" in named(events, "state.ignored")[0]["reason"]


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", ""])
def test_unsafe_profile_name_touches_no_file(
    store: TokenStore, state_dir: Path, clock: FakeClock, events: list[EventDict], name: str
) -> None:
    """A profile name that is no plain file name is refused for load, save and forget."""
    profile = replace(PROFILE, name=name)
    store.save(profile, make_token(clock))
    assert store.load(profile) is None
    store.forget(name)
    assert not state_dir.parent.exists() or not any(state_dir.parent.rglob("*.json"))
    assert [e["event"] for e in events] == [
        "state.save_failed",
        "state.ignored",
        "state.forget_failed",
    ]


# -- how files are written ---------------------------------------------------------------


def test_file_is_0600_and_directories_0700(
    store: TokenStore, state_dir: Path, clock: FakeClock
) -> None:
    """After a save the token file is 0600 and the state directory and new parents 0700."""
    store.save(PROFILE, make_token(clock))
    assert stat.S_IMODE((state_dir / "default.token.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(state_dir.parent.stat().st_mode) == 0o700


def test_loose_directory_is_tightened(
    store: TokenStore, state_dir: Path, clock: FakeClock, events: list[EventDict]
) -> None:
    """An existing 0755 state directory is set to 0700, and the change is logged."""
    state_dir.mkdir(parents=True)
    state_dir.chmod(0o755)
    store.save(PROFILE, make_token(clock))
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    [event] = named(events, "state.dir_tightened")
    assert (event["path"], event["was"]) == (str(state_dir), "0755")


def test_no_temp_files_linger(store: TokenStore, state_dir: Path, clock: FakeClock) -> None:
    """Repeated saves leave exactly one file per profile in the directory."""
    for _ in range(3):
        store.save(PROFILE, make_token(clock))
        store.save(replace(PROFILE, name="sandbox"), make_token(clock))
    assert sorted(os.listdir(state_dir)) == ["default.token.json", "sandbox.token.json"]


def test_concurrent_saves_leave_one_whole_file(
    store: TokenStore, state_dir: Path, clock: FakeClock
) -> None:
    """Saves of one profile from several threads at once leave one complete, loadable file."""
    tokens = [make_token(clock, access_token=f"token-number-{i:02d}") for i in range(8)]
    threads = [threading.Thread(target=store.save, args=(PROFILE, t)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10.0)
    loaded = store.load(PROFILE)
    assert loaded is not None
    assert loaded.access_token in {t.access_token for t in tokens}
    assert os.listdir(state_dir) == ["default.token.json"]


def test_save_into_unwritable_place_logs_and_returns(
    tmp_path: Path, clock: FakeClock, events: list[EventDict]
) -> None:
    """A state directory that cannot be created (under a regular file) logs state.save_failed."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = TokenStore(blocker / "state", clock=clock)
    store.save(PROFILE, make_token(clock))
    [event] = warnings(events)
    assert (event["event"], event["log_level"]) == ("state.save_failed", "warning")
    assert event["path"] == str(blocker / "state" / "default.token.json")
    assert "NotADirectoryError" in event["error"]


def test_failed_rename_removes_the_temp_file(
    store: TokenStore, state_dir: Path, clock: FakeClock, events: list[EventDict]
) -> None:
    """When the final rename fails (a directory is in the way), the temp file is removed."""
    (state_dir / "default.token.json" / "occupied").mkdir(parents=True)
    store.save(PROFILE, make_token(clock))
    assert [e["event"] for e in warnings(events)] == ["state.save_failed"]
    assert os.listdir(state_dir) == ["default.token.json"]


def test_a_save_that_fails_before_the_rename_keeps_the_previous_token(
    store: TokenStore,
    state_dir: Path,
    clock: FakeClock,
    events: list[EventDict],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that fails part-way (fsync of the new data) leaves the old file whole."""
    store.save(PROFILE, make_token(clock, access_token="first-token-abcdef"))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    clock.advance(1500.0)
    store.save(PROFILE, make_token(clock, access_token="second-token-abcdef"))
    monkeypatch.undo()
    token = store.load(PROFILE)
    assert token is not None and token.access_token == "first-token-abcdef"
    assert os.listdir(state_dir) == ["default.token.json"]
    assert [e["event"] for e in warnings(events)] == ["state.save_failed"]


def test_save_syncs_the_data_before_the_rename_and_the_directory_after(
    store: TokenStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durability order: fsync(temp file), rename onto the target, fsync(directory)."""
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        steps.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def recording_replace(src: str | Path, dst: str | Path) -> None:
        same_dir = Path(src).parent == Path(dst).parent and Path(src) != Path(dst)
        steps.append("rename" if same_dir else f"rename {src} -> {dst}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    store.save(PROFILE, make_token(clock))
    assert steps == ["fsync file", "rename", "fsync dir"]


def test_forget_deletes_the_saved_token(
    store: TokenStore, clock: FakeClock, events: list[EventDict]
) -> None:
    """After forget the profile has no saved token; forgetting twice is harmless."""
    store.save(PROFILE, make_token(clock))
    store.forget("default")
    store.forget("default")
    assert store.load(PROFILE) is None
    assert warnings(events) == []
