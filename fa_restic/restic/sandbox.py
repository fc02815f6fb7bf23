"""Runs a command that sees one user's home, and nothing it can redirect with a symlink.

Why: the service runs restic as root, and restic resolves the path strings it is given
for the whole run. A user who swaps any folder of a path for a symlink (before the job
starts or while restic reads) would have root read what the link points at: another
user's home, /etc/ssh. Checking the path first does not help; the swap comes after.

How: this file is also a small program, run in place of the command
(`python -I -S sandbox.py`, standard library only, so it starts in milliseconds). It

1. opens `<users>/<user>` with O_NOFOLLOW (a user cannot swap their own home: `users`
   belongs to root),
2. enters a private mount namespace (nothing it mounts is seen outside),
3. covers `<users>` with an empty root-owned tmpfs (the other homes disappear), and
   bind-mounts the opened home at `<users>/<user>` with `nosymfollow` (Linux >= 5.10;
   read-only unless asked): the path strings the command uses are the real ones, and no
   symlink inside the home is followed, whoever swaps it in and whenever,
4. changes into the requested folder of the home by that path (a symlink on the way
   fails here, with ELOOP) and executes the command, which keeps this process's pid.

A writable confinement (a restore straight into dst) shows less: only the requested
folder, reached from the home by an O_NOFOLLOW walk (a symlink anywhere on the way
refuses), is bind-mounted, writable and `nosymfollow`, at its real path; the rest of the
home is not there. restic, as root, can then write nothing but that folder's tree: a
symlink planted or swapped in (before restic starts or while it writes, at any depth)
fails with ELOOP where restic would follow it, and restic >= 0.17 replaces it. One thing a
mount cannot stop: restic < 0.17 writes into an existing file in place, so a hard link
to a file elsewhere on the same file system would be written through (the restore job
uses this mode with such a restic only where the home is a file system of its own).

Tested by tests/unit/test_sandbox.py (what a confined command sees) and
tests/integration/test_symlink_races.py, test_restore_safety.py and
test_restore_direct.py (attacks with the real restic).

It exits with EXIT_REFUSED and one `fa-restic sandbox:` line on stderr when it cannot.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from collections.abc import Mapping, Sequence

# Only what the helper needs is imported here: it runs before every confined restic, and
# json, dataclasses, subprocess and tempfile would add some 65 ms to each start (`probe`
# imports its own).

ENVIRONMENT_KEY = "FA_RESTIC_SANDBOX"
"""Where the confinement travels to the helper (not argv: other users can read argvs)."""
EXIT_REFUSED = 125
MESSAGE_PREFIX = "fa-restic sandbox: "

_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_NOSYMFOLLOW = 256
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


class Confinement:
    """What a confined command may see: one home, entered at one of its folders.

    `users_root`: the folder holding every home (root-owned, trusted, no symlinks in it).
    `folder`: the folder to run in, relative to the home ("" for the home itself).
    `writable`: only `folder` is mounted, writable (its tree is all the command sees of the
    home). A plain class, not a dataclass: see the imports.
    """

    __slots__ = ("folder", "user", "users_root", "writable")

    def __init__(self, users_root: str, user: str, folder: str = "", writable: bool = False):
        self.users_root = users_root
        self.user = user
        self.folder = folder
        self.writable = writable

    def _fields(self) -> tuple[str, str, str, bool]:
        return (self.users_root, self.user, self.folder, self.writable)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Confinement) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "Confinement(%r, %r, %r, writable=%r)" % self._fields()  # noqa: UP031

    def encode(self) -> str:
        """Returns the confinement as one environment value (hex fields: any path fits)."""
        texts = (self.users_root, self.user, self.folder)
        return ":".join(
            [
                *(text.encode("utf-8", "surrogateescape").hex() for text in texts),
                "1" if self.writable else "0",
            ]
        )

    @classmethod
    def decode(cls, value: str) -> Confinement:
        """Returns the confinement `encode` gave; raises ValueError if it is not one."""
        *texts, writable = value.split(":")
        if len(texts) != 3 or writable not in ("0", "1"):
            raise ValueError("not a confinement")
        users_root, user, folder = (
            bytes.fromhex(text).decode("utf-8", "surrogateescape") for text in texts
        )
        return cls(users_root, user, folder, writable == "1")

    @property
    def home(self) -> str:
        return os.path.join(self.users_root, self.user)

    @property
    def working_folder(self) -> str:
        return os.path.join(self.home, self.folder) if self.folder else self.home


def wrap(
    argv: Sequence[str], confinement: Confinement, python: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """Returns (argv, extra environment) that run `argv` confined."""
    command = [python, "-I", "-S", os.path.abspath(__file__), *argv]
    return command, {ENVIRONMENT_KEY: confinement.encode()}


class Refused(Exception):
    """The confinement could not be set up; the message says why, naming no other user."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise Refused(f"{what}: {os.strerror(code)}")


def _mount(
    libc: ctypes.CDLL,
    source: str | None,
    target: str,
    kind: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    _call(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            kind.encode() if kind else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {kind or 'bind'} at {target}",
    )


_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_below(home: int, folder: str) -> int:
    """Returns a descriptor of `folder` (relative to the open `home`), walked without symlinks.

    Raises Refused when a part is a symlink, a file, missing, or not a plain name.
    """
    parts = [part for part in folder.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise Refused(f"{folder!r} is not a plain path below the home")
    current = os.dup(home)
    try:
        for part in parts:
            following = os.open(part, _DIRECTORY, dir_fd=current)
            os.close(current)
            current = following
    except OSError as error:
        os.close(current)
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(
                f"{folder!r} has a symlink in it now (changed after it was checked)"
            ) from None
        raise Refused(f"cannot open {folder!r}: {error.strerror}") from None
    return current


def _show(libc: ctypes.CDLL, confinement: Confinement) -> None:
    """Covers the homes with an empty tmpfs and mounts what the command may see."""
    # Opened inside the namespace: a bind mount's source must be one of its mounts.
    try:
        users = os.open(confinement.users_root, _DIRECTORY)
        home = os.open(confinement.user, _DIRECTORY, dir_fd=users)
    except OSError as error:
        raise Refused(f"cannot open the home: {error.strerror}") from None
    try:
        shown, where = home, confinement.home
        if confinement.writable:
            shown, where = _open_below(home, confinement.folder), confinement.working_folder
        hidden = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        _mount(libc, "fa-restic", confinement.users_root, "tmpfs", hidden, "mode=0700,size=64k")
        # The folders above the mount point are the tmpfs's: root's, private, empty.
        os.makedirs(where, 0o700)
        _mount(libc, f"/proc/self/fd/{shown}", where, None, _MS_BIND)
        flags = _MS_BIND | _MS_REMOUNT | _MS_NOSYMFOLLOW | _MS_NOSUID | _MS_NODEV
        if not confinement.writable:
            flags |= _MS_RDONLY
        _mount(libc, None, where, None, flags)
    finally:
        os.close(home)
        os.close(users)
        if confinement.writable and shown != home:
            os.close(shown)


def enter(confinement: Confinement) -> str:
    """Sets up the namespace and changes into the working folder; returns its path.

    Raises Refused.
    """
    libc = _libc()
    _call(libc.unshare(_CLONE_NEWNS), "cannot make a private mount namespace")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _show(libc, confinement)
    target = confinement.working_folder
    try:
        os.chdir(target)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise Refused(
                f"{confinement.folder!r} has a symlink in it now (changed after it was checked)"
            ) from None
        raise Refused(f"cannot enter {confinement.folder!r}: {error.strerror}") from None
    return target


def is_folder(users_root: str, user: str, relative: str) -> bool:
    """Returns True if `relative` names a folder in the home, False for anything else.

    Walks from the home without following any symlink. Raises FileNotFoundError if it
    is gone, Refused if a symlink stands in its way or in its place.
    """
    directory = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    parts = [part for part in relative.split("/") if part]
    opened: list[int] = []
    try:
        current = os.open(users_root, directory)
        opened.append(current)
        for part in [user, *parts[:-1]]:
            current = os.open(part, directory, dir_fd=current)
            opened.append(current)
        if not parts:
            return True
        status = os.stat(parts[-1], dir_fd=current, follow_symlinks=False)
    except OSError as error:
        if error.errno == errno.ENOENT:
            raise FileNotFoundError(f"path no longer exists: {relative!r}") from None
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(
                f"{relative!r} has a symlink in it now (changed after it was checked)"
            ) from None
        raise
    finally:
        for descriptor in opened:
            os.close(descriptor)
    if stat.S_ISLNK(status.st_mode):
        raise Refused(f"{relative!r} is a symlink now (changed after it was checked)")
    return stat.S_ISDIR(status.st_mode)


def probe() -> str | None:
    """Returns None when confinement works here, else the reason (one line).

    Runs in a child of its own (the namespace stays there): a folder with a symlink to
    `/` is confined, and the symlink must not be followed.
    """
    import subprocess  # not in the helper's path (see the imports)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fa-restic-probe-") as scratch:
        users = os.path.realpath(os.path.join(scratch, "users"))
        os.makedirs(os.path.join(users, "probe"))
        os.symlink("/", os.path.join(users, "probe", "root"))
        command, extra = wrap(
            [sys.executable, "-I", "-S", "-c", "import os; os.stat('root/proc')"],
            Confinement(users, "probe"),
        )
        try:
            done = subprocess.run(
                command,
                env={**os.environ, **extra},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"the confinement helper did not run: {error}"
        if done.returncode == EXIT_REFUSED:
            return done.stderr.strip().removeprefix(MESSAGE_PREFIX) or "refused"
        if done.returncode == 0:
            return "nosymfollow is not honoured (Linux 5.10 or newer needed)"
        if "Too many levels of symbolic links" not in done.stderr:
            return f"unexpected probe failure: {done.stderr.strip()[-200:]}"
        return None


def _main(argv: list[str], environment: Mapping[str, str]) -> int:
    try:
        confinement = Confinement.decode(environment[ENVIRONMENT_KEY])
        target = enter(confinement)
    except (Refused, OSError, KeyError, ValueError, TypeError) as error:
        print(f"{MESSAGE_PREFIX}{error}", file=sys.stderr)
        return EXIT_REFUSED
    if not stat.S_ISDIR(os.stat(".").st_mode):
        print(f"{MESSAGE_PREFIX}{confinement.folder!r} is not a folder", file=sys.stderr)
        return EXIT_REFUSED
    child_environment = {key: value for key, value in environment.items() if key != ENVIRONMENT_KEY}
    child_environment["PWD"] = target
    try:
        os.execve(argv[0], argv, child_environment)  # noqa: S606 - no shell, on purpose
    except OSError as error:
        print(f"{MESSAGE_PREFIX}cannot run {argv[0]}: {error.strerror}", file=sys.stderr)
    return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:], os.environ))
