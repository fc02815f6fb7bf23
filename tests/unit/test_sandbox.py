"""fa_restic.restic.sandbox: a confined command sees one home and follows no symlink in it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fa_restic.restic import sandbox
from fa_restic.restic.sandbox import Confinement


@pytest.fixture
def users(tmp_path: Path) -> Path:
    """Homes of bob (a folder, a file, links to alice's home and to /etc) and alice."""
    root = tmp_path / "users"
    (root / "alice").mkdir(parents=True)
    (root / "alice" / "secret").write_text("alice's\n", encoding="utf-8")
    bob = root / "bob"
    (bob / "race0" / "deep").mkdir(parents=True)
    (bob / "race0" / "mine").write_text("bob's\n", encoding="utf-8")
    (bob / "to-alice").symlink_to(root / "alice")
    (bob / "to-etc").symlink_to("/etc")
    (bob / "race0" / "relative").symlink_to("../../alice/secret")
    return root


def confined(
    users: Path, command: list[str], folder: str = "", writable: bool = False
) -> subprocess.CompletedProcess[str]:
    argv, extra = sandbox.wrap(command, Confinement(str(users), "bob", folder, writable))
    return subprocess.run(
        argv, env={**os.environ, **extra}, capture_output=True, text=True, check=False, timeout=30
    )


def test_this_machine_can_confine() -> None:
    # The suite runs as root on Linux >= 5.10; the service refuses to start where this fails.
    assert sandbox.probe() is None


def test_the_command_runs_in_the_folder_under_its_real_path(users: Path) -> None:
    done = confined(users, ["/bin/sh", "-c", "pwd; cat mine"], "race0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(users / "bob" / "race0"), "bob's"]


@pytest.mark.parametrize(
    "path", ["to-alice/secret", "to-etc/hostname", "race0/relative", "to-alice"]
)
def test_no_symlink_in_the_home_is_followed(users: Path, path: str) -> None:
    done = confined(users, ["/bin/cat", path])
    assert done.returncode != 0
    assert "Too many levels of symbolic links" in done.stderr
    assert "alice's" not in done.stdout


def test_the_link_itself_is_still_readable_as_a_link(users: Path) -> None:
    done = confined(users, ["/bin/readlink", "to-etc"])
    assert (done.returncode, done.stdout.strip()) == (0, "/etc")


def test_other_homes_are_not_there(users: Path) -> None:
    done = confined(users, ["/bin/ls", "-A", str(users)])
    assert (done.returncode, done.stdout.split()) == (0, ["bob"])
    denied = confined(users, ["/bin/cat", str(users / "alice" / "secret")])
    assert denied.returncode != 0 and "No such file" in denied.stderr


def test_the_home_is_read_only_unless_asked(users: Path) -> None:
    done = confined(users, ["/bin/touch", "new"])
    assert done.returncode != 0 and "Read-only file system" in done.stderr
    assert confined(users, ["/bin/touch", "new"], writable=True).returncode == 0
    assert (users / "bob" / "new").exists()


def test_nothing_mounted_is_seen_outside(users: Path) -> None:
    assert confined(users, ["/bin/true"]).returncode == 0
    mounts = Path("/proc/self/mounts").read_text(encoding="utf-8")
    assert str(users) not in mounts
    assert sorted(os.listdir(users)) == ["alice", "bob"]


@pytest.mark.parametrize("folder", ["to-alice", "to-etc", "missing", "race0/mine"])
def test_a_folder_that_is_no_folder_of_the_home_is_refused(users: Path, folder: str) -> None:
    done = confined(users, ["/bin/true"], folder)
    assert done.returncode == sandbox.EXIT_REFUSED
    assert done.stderr.startswith(sandbox.MESSAGE_PREFIX)
    assert str(users / "alice") not in done.stderr


def test_the_confinement_does_not_reach_the_command(users: Path) -> None:
    done = confined(users, ["/usr/bin/env"])
    assert sandbox.ENVIRONMENT_KEY not in done.stdout
    assert f"PWD={users / 'bob'}" in done.stdout.splitlines()


def test_is_folder_walks_without_following(users: Path) -> None:
    root = str(users)
    assert sandbox.is_folder(root, "bob", "race0")
    assert sandbox.is_folder(root, "bob", "")
    assert not sandbox.is_folder(root, "bob", "race0/mine")
    for swapped in ("to-alice", "to-alice/secret", "to-etc/ssh", "race0/relative"):
        with pytest.raises(sandbox.Refused):
            sandbox.is_folder(root, "bob", swapped)
    with pytest.raises(FileNotFoundError):
        sandbox.is_folder(root, "bob", "race0/gone")


# -- the writable mode: a restore straight into one folder ---------------------------------


def test_writable_shows_only_the_folder_at_its_real_path(users: Path) -> None:
    (users / "bob" / "race0" / "deep" / "old").write_text("old\n", encoding="utf-8")
    script = "pwd; ls -A; ls -A ..; ls -A ../..; echo new > made; cat ../mine"
    done = confined(users, ["/bin/sh", "-c", script], "race0/deep", writable=True)
    lines = done.stdout.splitlines()
    assert lines[0] == str(users / "bob" / "race0" / "deep")
    assert lines[1:4] == ["old", "deep", "race0"]  # above it: empty folders of a private tmpfs
    assert "bob's" not in done.stdout and "No such file" in done.stderr
    assert (users / "bob" / "race0" / "deep" / "made").read_text(encoding="utf-8") == "new\n"
    assert sorted(os.listdir(users)) == ["alice", "bob"]


def test_writable_never_writes_through_a_symlink_in_the_folder(users: Path) -> None:
    deep = users / "bob" / "race0" / "deep"
    (deep / "to-alice").symlink_to(users / "alice")
    (deep / "secret").symlink_to(users / "alice" / "secret")
    script = "echo x > to-alice/planted; echo x > secret; mkdir -p to-alice/d"
    done = confined(users, ["/bin/sh", "-c", script], "race0/deep", writable=True)
    assert done.stderr.count("Too many levels of symbolic links") >= 2, done.stderr
    assert sorted(os.listdir(users / "alice")) == ["secret"]
    assert (users / "alice" / "secret").read_text(encoding="utf-8") == "alice's\n"


@pytest.mark.parametrize("folder", ["to-alice", "to-etc/ssh", "race0/relative", "race0/../.."])
def test_writable_refuses_a_folder_reached_through_a_symlink(users: Path, folder: str) -> None:
    done = confined(users, ["/bin/touch", "x"], folder, writable=True)
    assert done.returncode == sandbox.EXIT_REFUSED, done.stderr
    assert done.stderr.startswith(sandbox.MESSAGE_PREFIX)
    assert not (users / "alice" / "x").exists() and not Path("/etc/ssh/x").exists()


@pytest.mark.parametrize(
    "confinement",
    [
        Confinement("/srv/fa/data/users", "alice"),
        Confinement("/srv/a:b", "bob", "x:y\nz/ü/\udcff", writable=True),
    ],
)
def test_a_confinement_travels_whole_in_one_environment_value(confinement: Confinement) -> None:
    value = confinement.encode()
    assert "\n" not in value and "\0" not in value
    assert Confinement.decode(value) == confinement


@pytest.mark.parametrize("value", ["", "a:b:c", "zz:00:00:1", "00:00:00:2", "00:00:00:00:1"])
def test_a_value_that_is_not_a_confinement_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        Confinement.decode(value)
