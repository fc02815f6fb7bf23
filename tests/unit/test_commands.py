"""The exact argv restic is given: no shell, user paths after `--`, no secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fa_restic.restic import commands, runner
from fa_restic.restic.commands import Binary, Repository
from fa_restic.restic.features import ResticVersion

CACHE = Path("/var/cache/fa")
V14 = Binary("/usr/bin/restic", ResticVersion(0, 14, 0), CACHE)
V15 = Binary("/usr/bin/restic", ResticVersion(0, 15, 2), CACHE)
V16 = Binary("/opt/restic", ResticVersion(0, 16, 0), CACHE)
V18 = Binary("/opt/restic", ResticVersion(0, 18, 0), CACHE)

SECRET_URL = "rest:https://alice:s3cret@backup.example:8000/alice/"
SECRET_FILE = Path("/etc/fa/repo.password")


def test_backup_argv_puts_tags_before_and_paths_after_the_double_dash() -> None:
    argv = commands.backup_command(V18, ["fa:id=7", "fa:user=alice"], ["."]).argv
    assert argv == (
        "/opt/restic",
        "--cache-dir",
        "/var/cache/fa",
        "backup",
        "--json",
        "--tag",
        "fa:id=7",
        "--tag",
        "fa:user=alice",
        "--",
        ".",
    )


def test_backup_argv_keeps_option_like_file_names_as_paths() -> None:
    argv = commands.backup_command(V14, ["fa:id=1"], ["--password=x", "-r", "a b; rm -rf /"]).argv
    assert argv[argv.index("--") + 1 :] == ("--password=x", "-r", "a b; rm -rf /")
    assert argv[: argv.index("--")] == (
        "/usr/bin/restic",
        "--cache-dir",
        "/var/cache/fa",
        "backup",
        "--json",
        "--tag",
        "fa:id=1",
    )


def test_a_comma_in_a_tag_is_refused() -> None:
    # restic splits `--tag a,b` into two tags (NOTES §4).
    with pytest.raises(ValueError, match="commas"):
        commands.backup_command(V18, ["fa:user=a,b"], ["."])


def test_restore_argv() -> None:
    snapshot = "c" * 64
    assert commands.restore_command(V18, snapshot, Path("/data/users/alice/back")).argv == (
        "/opt/restic",
        "--cache-dir",
        "/var/cache/fa",
        "restore",
        "--json",
        "--target",
        "/data/users/alice/back",
        "--",
        snapshot,
    )


def test_snapshots_argv_ands_its_tags() -> None:
    assert commands.snapshots_command(V14, ["fa:id=3", "fa:user=bob"]).argv == (
        "/usr/bin/restic",
        "--cache-dir",
        "/var/cache/fa",
        "snapshots",
        "--json",
        "--tag",
        "fa:id=3,fa:user=bob",
        "--",
    )
    assert commands.snapshots_command(V14, snapshot_ids=["f9cb9262"]).argv == (
        "/usr/bin/restic",
        "--cache-dir",
        "/var/cache/fa",
        "snapshots",
        "--json",
        "--",
        "f9cb9262",
    )


def test_stats_argv() -> None:
    assert commands.stats_command(V18, "abc").argv == (
        "/opt/restic",
        "--cache-dir",
        "/var/cache/fa",
        "stats",
        "--json",
        "--mode",
        "restore-size",
        "--",
        "abc",
    )


@pytest.mark.parametrize("binary", [V14, V15])
def test_no_retry_lock_before_0_16(binary: Binary) -> None:
    # 0.14 fails with `unknown flag: --retry-lock`.
    assert commands.forget_command(binary, ["a" * 64], lock_wait=120).argv == (
        "/usr/bin/restic",
        "--cache-dir",
        "/var/cache/fa",
        "forget",
        "--",
        "a" * 64,
    )
    assert commands.prune_command(binary, lock_wait=120).argv == (
        "/usr/bin/restic",
        "--cache-dir",
        "/var/cache/fa",
        "prune",
    )


@pytest.mark.parametrize("binary", [V16, V18])
def test_retry_lock_from_0_16(binary: Binary) -> None:
    assert commands.forget_command(binary, ["a" * 64, "b" * 64], lock_wait=120).argv == (
        "/opt/restic",
        "--cache-dir",
        "/var/cache/fa",
        "forget",
        "--retry-lock",
        "120s",
        "--",
        "a" * 64,
        "b" * 64,
    )
    assert commands.prune_command(binary, lock_wait=0.2).argv == (
        "/opt/restic",
        "--cache-dir",
        "/var/cache/fa",
        "prune",
        "--retry-lock",
        "1s",
    )
    assert commands.prune_command(binary, lock_wait=0).argv == (
        "/opt/restic",
        "--cache-dir",
        "/var/cache/fa",
        "prune",
    )


def test_other_argv() -> None:
    base = ("/opt/restic", "--cache-dir", "/var/cache/fa")
    assert commands.version_command("/opt/restic").argv == ("/opt/restic", "version")
    assert commands.init_command(V18).argv == (*base, "init")
    assert commands.cat_config_command(V18).argv == (*base, "cat", "config", "--no-lock")
    assert commands.unlock_command(V18).argv == (*base, "unlock")
    assert commands.list_locks_command(V18).argv == (*base, "list", "locks", "--no-lock")
    assert commands.check_command(V18).argv == (*base, "check")


def test_environment_carries_the_repository_and_its_secrets() -> None:
    repository = Repository(
        url=SECRET_URL,
        password_file=SECRET_FILE,
        env={"AWS_SECRET_ACCESS_KEY": "k3y"},
    )
    assert repository.environment(progress_fps=2.0) == {
        "RESTIC_REPOSITORY": SECRET_URL,
        "RESTIC_PASSWORD_FILE": str(SECRET_FILE),
        "RESTIC_PROGRESS_FPS": "2",
        "AWS_SECRET_ACCESS_KEY": "k3y",
    }


def test_environment_with_a_password_command() -> None:
    environment = Repository(url="/srv/repo", password_command="pass show restic").environment(0.5)
    assert environment == {
        "RESTIC_REPOSITORY": "/srv/repo",
        "RESTIC_PASSWORD_COMMAND": "pass show restic",
        "RESTIC_PROGRESS_FPS": "0.5",
    }


def test_no_secret_in_any_argv() -> None:
    every_argv = [
        commands.backup_command(V18, ["fa:id=1", "fa:user=alice"], ["."]).argv,
        commands.restore_command(V18, "a" * 64, Path("/t")).argv,
        commands.snapshots_command(V18, ["fa:id=1"]).argv,
        commands.stats_command(V18, "a" * 64).argv,
        commands.forget_command(V18, ["a" * 64], 10).argv,
        commands.prune_command(V18, 10).argv,
        commands.init_command(V18).argv,
        commands.cat_config_command(V18).argv,
        commands.unlock_command(V18).argv,
        commands.check_command(V18).argv,
        commands.list_locks_command(V18).argv,
    ]
    for argv in every_argv:
        joined = " ".join(argv)
        for secret in ("s3cret", "backup.example", str(SECRET_FILE), "password", "-r ", "--repo"):
            assert secret not in joined, argv


def test_restic_child_does_not_inherit_restic_or_service_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stray RESTIC_PASSWORD would silently override the configured password file.
    monkeypatch.setenv("RESTIC_PASSWORD", "stray")
    monkeypatch.setenv("RESTIC_REPOSITORY", "/elsewhere")
    monkeypatch.setenv("FA_JWT_SECRET", "jwt-secret")
    monkeypatch.setenv("HOME", "/root")
    environment = runner.child_environment(
        Repository(url="/srv/repo", password_file=SECRET_FILE).environment(1.0)
    )
    assert "RESTIC_PASSWORD" not in environment
    assert "FA_JWT_SECRET" not in environment
    assert environment["RESTIC_REPOSITORY"] == "/srv/repo"
    assert environment["RESTIC_PASSWORD_FILE"] == str(SECRET_FILE)
    assert environment["HOME"] == "/root"


def test_each_command_says_which_lock_it_takes() -> None:
    """A killed restic that took a lock may leave it; one that took none leaves none."""
    lock = commands.Lock
    assert commands.backup_command(V18, ["fa:id=1"], ["."]).lock is lock.SHARED
    assert commands.restore_command(V18, "a" * 64, Path("/t")).lock is lock.SHARED
    assert commands.snapshots_command(V18).lock is lock.SHARED
    assert commands.stats_command(V18, "a" * 64).lock is lock.SHARED
    assert commands.forget_command(V18, ["a" * 64]).lock is lock.EXCLUSIVE
    assert commands.prune_command(V18).lock is lock.EXCLUSIVE
    assert commands.check_command(V18).lock is lock.EXCLUSIVE
    for no_lock in (
        commands.unlock_command(V18),
        commands.list_locks_command(V18),
        commands.cat_config_command(V18),
        commands.init_command(V18),
        commands.version_command("/opt/restic"),
    ):
        assert no_lock.lock is lock.NONE, no_lock
