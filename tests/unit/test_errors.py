"""restic's failures classified from real captures of 0.14, 0.18 and 0.19 (tests/samples)."""

from __future__ import annotations

import asyncio

import pytest

from fa_restic.restic.errors import MESSAGE_LIMIT, ErrorKind, classify, clean_line
from fa_restic.restic.watch import StderrWatcher
from tests.unit.samples import load


def _classify(name: str) -> tuple[ErrorKind, str, int | None]:
    sample = load(name)
    error = classify(sample.exit_code, sample.stderr)
    return error.kind, error.message, error.exit_code


LOCK_HOLDER_14 = (
    "unable to create lock in backend: repository is already locked exclusively by PID 9390 "
    "on vm by root (UID 0, GID 0)"
)
LOCK_HOLDER_18 = LOCK_HOLDER_14.replace("9390", "9510")
LOCK_HOLDER_19 = LOCK_HOLDER_14.replace("9390", "20477")
REPO_MISSING_19 = (
    "repository does not exist: unable to open config file: stat /srv/lab/nonexistent/config: "
    "no such file or directory"
)
ALL_MISSING_19 = "all source directories/files do not exist"
NO_SNAPSHOT_19 = 'failed to find snapshot: no matching ID found for prefix "deadbeef"'
INVALID_ENV_19 = (
    'invalid value for RESTIC_COMPRESSION "bogus": invalid compression mode "bogus", '
    "must be one of (auto|off|fastest|better|max)"
)


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ("v14-err-locked-backup", (ErrorKind.LOCKED, LOCK_HOLDER_14, 1)),
        ("v14-err-locked-snapshots", (ErrorKind.LOCKED, LOCK_HOLDER_14, 1)),
        ("v14-err-locked-prune-text", (ErrorKind.LOCKED, LOCK_HOLDER_14, 1)),
        ("v18-err-locked-backup", (ErrorKind.LOCKED, LOCK_HOLDER_18, 11)),
        ("v18-err-locked-snapshots", (ErrorKind.LOCKED, LOCK_HOLDER_18, 11)),
        (
            "v18-cancel-SIGKILL-then-forget-retry-lock-5s",
            (
                ErrorKind.LOCKED,
                "unable to create lock in backend: repository is already locked by PID 15330 "
                "on vm by root (UID 0, GID 0)",
                11,
            ),
        ),
        (
            "v14-err-repo-missing-backup",
            (
                ErrorKind.REPOSITORY_MISSING,
                "unable to open config file: stat /srv/lab/nonexistent/config: "
                "no such file or directory",
                1,
            ),
        ),
        (
            "v18-err-repo-missing-backup",
            (
                ErrorKind.REPOSITORY_MISSING,
                "repository does not exist: unable to open config file: "
                "stat /srv/lab/nonexistent/config: no such file or directory",
                10,
            ),
        ),
        ("v14-err-repo-missing-snapshots", (ErrorKind.REPOSITORY_MISSING,)),
        ("v18-err-repo-missing-text", (ErrorKind.REPOSITORY_MISSING,)),
        ("v14-err-wrong-password", (ErrorKind.WRONG_PASSWORD, "wrong password or no key found", 1)),
        (
            "v18-err-wrong-password",
            (ErrorKind.WRONG_PASSWORD, "wrong password or no key found", 12),
        ),
        ("v18-err-wrong-password-text", (ErrorKind.WRONG_PASSWORD,)),
        (
            "v14-err-backup-nonexistent-path-json",
            (ErrorKind.FATAL, "all target directories/files do not exist", 1),
        ),
        (
            "v18-err-backup-nonexistent-path-json",
            (ErrorKind.FATAL, "all source directories/files do not exist", 1),
        ),
        (
            "v14-err-restore-nonexistent-snapshot-json",
            (
                ErrorKind.FATAL,
                'invalid id "deadbeef": no matching ID found for prefix "deadbeef"',
                1,
            ),
        ),
        (
            "v18-err-restore-nonexistent-snapshot-json",
            (
                ErrorKind.FATAL,
                'failed to find snapshot: no matching ID found for prefix "deadbeef"',
                1,
            ),
        ),
        (
            "v14-err-no-password-stdin-devnull",
            (ErrorKind.FATAL, "an empty password is not a password", 1),
        ),
        ("v14-retry-lock-flag", (ErrorKind.FATAL, "unknown flag: --retry-lock", 1)),
        ("v19-err-locked-backup", (ErrorKind.LOCKED, LOCK_HOLDER_19, 11)),
        ("v19-err-locked-snapshots", (ErrorKind.LOCKED, LOCK_HOLDER_19, 11)),
        ("v19-err-repo-missing-backup", (ErrorKind.REPOSITORY_MISSING, REPO_MISSING_19, 10)),
        ("v19-err-wrong-password", (ErrorKind.WRONG_PASSWORD, "wrong password or no key found")),
        ("v19-err-backup-nonexistent-path-json", (ErrorKind.FATAL, ALL_MISSING_19, 1)),
        ("v19-err-restore-nonexistent-snapshot-json", (ErrorKind.FATAL, NO_SNAPSHOT_19, 1)),
        ("v19-cancel-SIGINT", (ErrorKind.INTERRUPTED, "unable to save snapshot: context canceled")),
        ("v19-err-invalid-env-compression", (ErrorKind.FATAL, INVALID_ENV_19, 1)),
    ],
)
def test_classify_real_failures(sample: str, expected: tuple[object, ...]) -> None:
    assert _classify(sample)[: len(expected)] == expected


def test_lock_errors_are_transient_and_others_are_not() -> None:
    assert _classify("v14-err-locked-backup")[0].is_transient
    assert _classify("v18-err-locked-backup")[0].is_transient
    for name in (
        "v14-err-wrong-password",
        "v18-err-repo-missing-backup",
        "v18-err-backup-nonexistent-path-json",
    ):
        assert not _classify(name)[0].is_transient, name


def test_message_is_one_line_without_hints() -> None:
    # restic's lock error goes on with "lock was created at ..." and the `unlock` hint.
    for name in ("v14-err-locked-backup", "v18-err-locked-backup", "v18-err-repo-missing-backup"):
        _, message, _ = _classify(name)
        assert "\n" not in message
        assert "unlock" not in message and "Is there a repository" not in message
        assert not message.startswith("Fatal:")


# `restic snapshots --json -r rest:http://127.0.0.1:1/r1/` with nothing listening (captured on
# this machine). 0.14 fails at once; 0.18 retries with backoff until it is interrupted.
REST_DOWN_14 = [
    'Fatal: unable to open config file: client.Head: Head "http://127.0.0.1:1/r1/config": '
    "dial tcp 127.0.0.1:1: connect: connection refused",
    "Is there a repository at the following location?",
    "rest:http://127.0.0.1:1/r1/",
]
REST_DOWN_18_RETRIES = [
    'Stat(<config/>) returned error, retrying after 1.05869355s: Head "http://:***@127.0.0.1:1/'
    'r1/config": dial tcp 127.0.0.1:1: connect: connection refused',
    'Stat(<config/>) returned error, retrying after 1.833257235s: Head "http://:***@127.0.0.1:1/'
    'r1/config": dial tcp 127.0.0.1:1: connect: connection refused',
]
REST_DOWN_18_INTERRUPTED = [
    *REST_DOWN_18_RETRIES,
    "\x1b[2Ksignal terminated received, cleaning up",
    '{"message_type":"exit_error","code":1,"message":"Fatal: unable to open config file: '
    "context canceled\\nIs there a repository at the following location?\\n"
    'rest:http://127.0.0.1:1/r1/"}',
]


def test_rest_server_down_on_v14_is_a_transient_backend_error() -> None:
    error = classify(1, REST_DOWN_14)
    assert error.kind is ErrorKind.BACKEND
    assert error.kind.is_transient
    assert error.message == (
        'unable to open config file: client.Head: Head "http://127.0.0.1:1/r1/config": '
        "dial tcp 127.0.0.1:1: connect: connection refused"
    )


def test_rest_server_down_on_v18_is_a_backend_error() -> None:
    error = classify(1, REST_DOWN_18_RETRIES)
    assert error.kind is ErrorKind.BACKEND


def test_v18_interrupted_while_opening_is_not_a_missing_repository() -> None:
    # "Is there a repository ..." follows every failure to open; "context canceled" says
    # restic was interrupted, so the repository must not be taken for missing.
    error = classify(1, REST_DOWN_18_INTERRUPTED)
    assert error.kind is ErrorKind.INTERRUPTED
    assert error.message == "unable to open config file: context canceled"


def test_v18_backup_interrupted_by_sigint() -> None:
    stderr = [
        "\x1b[2Ksignal interrupt received, cleaning up",
        '{"message_type":"exit_error","code":1,'
        '"message":"Fatal: unable to save snapshot: context canceled"}',
    ]
    error = classify(1, stderr)
    assert (error.kind, error.message) == (
        ErrorKind.INTERRUPTED,
        "unable to save snapshot: context canceled",
    )


def test_v14_interrupted_by_sigint_exits_130() -> None:
    error = classify(130, ["\x1b[2Ksignal interrupt received, cleaning up"])
    assert error.kind is ErrorKind.INTERRUPTED
    assert error.message == "signal interrupt received, cleaning up"  # no ANSI escape


def test_exit_code_alone() -> None:
    assert classify(12, []).kind is ErrorKind.WRONG_PASSWORD
    assert classify(10, []).kind is ErrorKind.REPOSITORY_MISSING
    assert classify(11, []).kind is ErrorKind.LOCKED
    error = classify(1, [])
    assert (error.kind, error.message) == (ErrorKind.FATAL, "restic exited with code 1")


def test_no_space_left() -> None:
    error = classify(
        1, ["Fatal: unable to save snapshot: write /repo/data/ab/abcd: no space left on device"]
    )
    assert error.kind is ErrorKind.NO_SPACE
    assert not error.kind.is_transient


def test_clean_line_strips_escapes_joins_lines_and_caps_length() -> None:
    assert clean_line("\x1b[2Kone\n  two  \n\nthree") == "one two three"
    long = clean_line("x" * 1000)
    assert len(long) == MESSAGE_LIMIT and long.endswith("…")
    assert len(classify(1, ["Fatal: " + "y" * 5000]).message) == MESSAGE_LIMIT


# restic 0.14 reading a lock another restic removed after it listed the locks (restic#1523):
# it retries for some 15 minutes. The lines as 0.14 prints them, for a local and an S3 repo.
VANISHED_LOCAL = (
    "Load(<lock/20e347e327>, 0, 0) returned error, retrying after 552.330144ms: open "
    "/srv/repo/locks/20e347e327aa: no such file or directory"
)
VANISHED_S3 = (
    "Load(<lock/20e347e327>, 0, 0) returned error, retrying after 1.080381816s: "
    "The specified key does not exist."
)
DATA_RETRY = (
    "Load(<data/1b29aa0c3e>, 0, 0) returned error, retrying after 552.330144ms: connection refused"
)


@pytest.mark.parametrize("line", [VANISHED_LOCAL, VANISHED_S3])
async def test_a_vanished_lock_stops_restic_at_once_to_be_run_again(line: str) -> None:
    watcher = StderrWatcher(None, backend_wait=120.0, forward=None)
    run = asyncio.get_running_loop().create_future()
    watcher.watch(run)
    watcher(line)
    assert run.cancelled(), "restic < 0.17 would retry the lock file for 15 minutes"
    assert watcher.reason is not None and watcher.reason.kind is ErrorKind.LOCKED
    assert watcher.reason.kind.is_transient
    watcher.close()


async def test_a_retried_data_file_is_waited_for_as_an_outage() -> None:
    watcher = StderrWatcher(None, backend_wait=120.0, forward=None)
    run = asyncio.get_running_loop().create_future()
    watcher.watch(run)
    watcher(DATA_RETRY)
    assert not run.done() and watcher.reason is None  # the backend gets its wait
    watcher.close()
