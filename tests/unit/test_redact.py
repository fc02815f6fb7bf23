"""What a user or an anonymous caller sees of restic's errors (SPEC §9): the repository as
`<repository>`, hosts as `<host>`, no backend account, password, host or repository path.

The texts are real: tests/samples/v1{4,8}-err-{rest-down-credentials,rest-unknown-host,
sftp-down,s3-down,local-missing}.txt were captured on this machine with restic 0.14.0 and
0.18.0 (`restic --no-cache -r URL snapshots --json`, nothing listening on port 1 or 22, an
unknown host name; the 0.18 runs that retry were stopped with SIGINT by `timeout`, exit 124).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fa_restic.restic.errors import classify
from fa_restic.restic.redact import HOST, REPOSITORY, redact, repository_forms

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

REST_DOWN = "rest:http://fauser:s3cret@127.0.0.1:1/repo/"
REST_UNKNOWN_HOST = "rest:http://fauser:s3cret@nosuchhost.invalid:8000/repo/"
SFTP = "sftp:fauser@127.0.0.1:/srv/repo"
S3 = "s3:http://127.0.0.1:1/bucket"
LOCAL = "/srv/fa-restic/repo"

# capture name -> (configured URL, texts that must not be shown)
CAPTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "err-rest-down-credentials": (REST_DOWN, ("fauser", "s3cret", "127.0.0.1", ":1/", "/repo")),
    "err-rest-unknown-host": (
        REST_UNKNOWN_HOST,
        ("fauser", "s3cret", "nosuchhost", "10.255.255.53", "/repo"),
    ),
    "err-sftp-down": (SFTP, ("fauser", "127.0.0.1", "/srv/repo")),
    "err-s3-down": (S3, ("127.0.0.1", "bucket")),
    "err-local-missing": (LOCAL, ("/srv", "fa-restic")),
}


def _stderr(name: str) -> tuple[list[str], int]:
    """Returns the stderr lines and exit code of a capture (`$ command` / `--- stdout` /
    `--- stderr` / `--- exit code: N`)."""
    text = (SAMPLES / f"{name}.txt").read_text(encoding="utf-8")
    _, _, after = text.partition("--- stderr\n")
    lines, _, code = after.partition("--- exit code: ")
    return lines.splitlines(), int(code.strip())


@pytest.mark.parametrize("version", ["v14", "v18"])
@pytest.mark.parametrize("capture", sorted(CAPTURES))
def test_captured_errors_name_no_account_host_or_path(version: str, capture: str) -> None:
    url, secret_parts = CAPTURES[capture]
    lines, exit_code = _stderr(f"{version}-{capture}")
    assert lines, capture
    message = classify(exit_code, lines).message  # what a job's `extra` holds
    for text in [*lines, message]:
        shown = redact(text, url)
        for part in secret_parts:
            assert part not in shown, (text, shown)
    shown = redact("\n".join(lines), url)
    assert REPOSITORY in shown or HOST in shown, shown


def test_rest_down_on_v14_as_a_user_sees_it() -> None:
    lines, exit_code = _stderr("v14-err-rest-down-credentials")
    assert redact(lines[0], REST_DOWN) == (
        'Fatal: unable to open config file: client.Head: Head "<repository>": '
        "dial tcp <host>: connect: connection refused"
    )
    assert redact(lines[2], REST_DOWN) == "<repository>"
    assert redact(classify(exit_code, lines).message, REST_DOWN) == (
        'unable to open config file: client.Head: Head "<repository>": '
        "dial tcp <host>: connect: connection refused"
    )


def test_unknown_host_and_its_dns_server_are_hosts() -> None:
    lines, _ = _stderr("v18-err-rest-unknown-host")
    assert redact(lines[0], REST_UNKNOWN_HOST) == (
        'Stat(<config/>) returned error, retrying after 829.360433ms: Head "<repository>": '
        "dial tcp: lookup <host> on <host>: no such host"
    )


def test_local_repository_and_files_below_it() -> None:
    lines, _ = _stderr("v14-err-local-missing")
    assert [redact(line, LOCAL) for line in lines] == [
        "Fatal: unable to open config file: stat <repository>: no such file or directory",
        "Is there a repository at the following location?",
        "<repository>",
    ]
    # A sibling folder with a longer name is not the repository; a sentence's full stop
    # after the path stays.
    assert redact(f"{LOCAL}-old and {LOCAL}.", LOCAL) == f"{LOCAL}-old and <repository>."
    assert redact(f"local:{LOCAL}/locks/1f2e", f"local:{LOCAL}") == "<repository>"


def test_sftp_and_its_ssh_line() -> None:
    lines, _ = _stderr("v14-err-sftp-down")
    assert [redact(line, SFTP) for line in lines] == [
        "subprocess ssh: ssh: connect to host <host> port 22: Connection refused",
        "Fatal: unable to open repository at <repository>: unable to start the sftp session, "
        "error: EOF",
    ]


def test_the_password_as_configured_is_replaced_too() -> None:
    # restic masks it, but a text that quotes the configured URL must not show it either.
    assert redact(f"at {REST_DOWN}: refused", REST_DOWN) == "at <repository>: refused"
    assert redact('Head "http://fauser:s3cret@127.0.0.1:1/repo/config"', REST_DOWN) == (
        'Head "<repository>"'
    )


def test_forms_restic_prints() -> None:
    forms = repository_forms(REST_DOWN)
    assert "rest:http://fauser:***@127.0.0.1:1/repo/" in forms
    assert "http://fauser:***@127.0.0.1:1/repo" in forms
    assert forms == tuple(sorted(forms, key=len, reverse=True))
    assert repository_forms("local:/var/repo") == ("local:/var/repo", "/var/repo")
    assert repository_forms("") == ()


def test_urls_and_addresses_it_was_not_told_about() -> None:
    # restic 0.18 prints `:***@` even for a URL without an account (tests/unit/test_errors.py).
    text = 'Head "http://:***@10.1.2.3:8000/r1/config": dial tcp 10.1.2.3:8000: i/o timeout'
    assert redact(text, LOCAL) == 'Head "<repository>": dial tcp <host>: i/o timeout'
    assert redact("Fatal: at rest:https://u:***@backup.example:443/x/: 401", LOCAL) == (
        "Fatal: at <repository>: 401"
    )


def test_lock_holder_machine_and_account() -> None:
    # v18-err-locked-backup (shared restic samples), the line that names the holder.
    line = (
        "unable to create lock in backend: repository is already locked exclusively by PID "
        "9510 on vm by root (UID 0, GID 0)"
    )
    assert redact(line, LOCAL) == (
        "unable to create lock in backend: repository is already locked exclusively by PID "
        "9510 on <host>"
    )


def test_ordinary_texts_are_left_alone() -> None:
    for text in (
        "",
        "incomplete: 2 items could not be read: /data/users/alice/docs/secret.txt",
        "cancelled by alice before it started",
        "restic 0.18.0 compiled with go1.24.4 on linux/amd64",
    ):
        assert redact(text, REST_DOWN) == text
