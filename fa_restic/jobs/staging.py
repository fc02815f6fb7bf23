"""Restores go through a private staging folder, never straight into a user's folder.

Why this exists: the service often runs as root, and restic writes a restore by path.
A user owns the folders of their home, so they can put a symlink where restic is about
to write, and restic (as root) then writes through it, anywhere on the machine:

- restic < 0.17 follows a symlink that already exists inside `--target`: a planted
  `dst/sub -> /etc` and a backup holding `sub/x` make restic write `/etc/x`.
- restic 0.17+ replaces such a symlink (`Feature.RESTORE_REPLACES_SYMLINKS`), but it
  still follows a symlink in the target's own path (`dst` is `a/b` and the user turns `a`
  into `a -> /etc` after the request was accepted: `/etc/b/...` is written), and a folder
  swapped for a symlink while restic writes into it: measured with restic 0.18 as root,
  2993 of 3000 files of a restore went through a symlink a user loop kept putting in
  place of a restored folder.

So every restore, whatever the restic version, goes like this:

1. restic restores into `<data_root>/.fa-restic-staging/restore-<id>-<random>`: a folder
   of the service user's, mode 0700, outside every home (homes are
   `<data_root>/users/<user>`), so no user can put anything in restic's way. restic < 0.16
   has no restore progress of its own; the service measures the bytes under the restic
   target, so progress keeps working there.
2. The staged tree is then moved into dst without ever following a symlink: dst is opened
   from the home one component at a time with O_NOFOLLOW (a symlink anywhere in dst's path
   fails the restore instead of escaping), and every entry is moved with `renameat`
   relative to open folder descriptors. A name already in dst is replaced the way restic
   0.18 does it: a file or symlink in the way is replaced (`rename` replaces the symlink
   itself, never its target), a folder in the way of a file is removed (by descriptor,
   never entering another file system), a folder meets a folder and the two are merged
   (the folder then gets the restored folder's owner, mode and times).
3. If staging and the home are on different file systems (EXDEV), the entries are copied
   through the same descriptors instead: files created with O_CREAT|O_EXCL|O_NOFOLLOW after
   whatever was there is unlinked, then content, extended attributes, owner, mode and times
   set on the new file's descriptor. Hard links are not kept across such a copy.
4. What is already in dst follows the restore's overwrite policy (SPEC §11), the same on
   every restic version since restic itself never sees dst: `always` replaces it as above,
   `never` keeps whatever is there, `if-newer` keeps it when its mtime is as new as the
   restored entry's or newer. Folders meeting folders are merged under every policy (new
   entries land inside); a kept folder keeps its own metadata.
5. The staging folder is removed, also after a failed or cancelled restore, whose partial
   files are moved into dst first (SPEC: partial files stay in dst on cancel).

A user may still move a folder of theirs while it is being filled, to anywhere they can
write on the same file system; what lands there is their own restored data.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import TypeVar

from fa_restic.names import STAGING_FOLDER, Overwrite

log = logging.getLogger("fa_restic.jobs")

"""Below the data root, next to `users/`: never inside a folder a user may write to."""
_PREFIX = "restore-"
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SWAPPED = (errno.ELOOP, errno.ENOTDIR)
"""What opening a folder with O_NOFOLLOW says when a symlink or a file took its place."""
_RACED = (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.ELOOP)
"""What a move or create says when the user changed the name meanwhile: look again."""
_ATTEMPTS = 8
_FAILURES_NAMED = 3
_COPY_CHUNK = 1 << 24

T = TypeVar("T")


class StagingError(OSError):
    """Restored files could not be put in place; the message says why (no traceback)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "staging failed"


# -- the staging folder ------------------------------------------------------------------


def staging_root(data_root: Path) -> Path:
    return data_root / STAGING_FOLDER


def make_staging(data_root: Path, restore_id: int) -> Path:
    """Makes and returns a new, empty staging folder for one restore (mode 0700)."""
    root = staging_root(data_root)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    descriptor = os.open(root, _DIRECTORY_FLAGS)
    try:
        status = os.fstat(descriptor)
        if status.st_uid != os.geteuid():
            raise StagingError(f"{root} is not owned by the service user: refusing to use it")
        if stat.S_IMODE(status.st_mode) != 0o700:
            os.fchmod(descriptor, 0o700)
    finally:
        os.close(descriptor)
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{restore_id}-", dir=root))


def remove_staging(path: Path) -> None:
    """Removes a staging folder and everything left in it (modes restic set included)."""
    unlocked: set[str] = set()

    def unlock(function: Callable[..., object], failed: str, error: object) -> None:
        # restic restores a folder's mode, even 000, and a service that is not root is
        # then locked out of it. Only the service can reach the staging folder: fixing
        # modes by path here is safe.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
        if failed in unlocked:
            return  # unlocked once already: leave it (the caller logs what stays)
        unlocked.add(failed)
        if os.path.isdir(failed) and not os.path.islink(failed):
            with contextlib.suppress(OSError):
                os.chmod(failed, 0o700)
            remove(failed)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(failed)

    def remove(folder: str) -> None:
        if sys.version_info >= (3, 12):
            shutil.rmtree(folder, onexc=unlock)
        else:
            shutil.rmtree(folder, onerror=unlock)

    if os.path.lexists(path):
        remove(str(path))
        if os.path.lexists(path):
            raise StagingError(f"cannot remove the staging folder {path}")


def sweep_staging(data_root: Path, active: Collection[int]) -> None:
    """Removes staging folders of restores that are not running (left by a killed service)."""
    root = staging_root(data_root)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return
    for name in names:
        restore_id = name.removeprefix(_PREFIX).split("-", 1)[0]
        if name.startswith(_PREFIX) and restore_id.isdigit() and int(restore_id) in active:
            continue
        log.info("removing a leftover restore staging folder %s", root / name)
        try:
            remove_staging(root / name)
        except OSError as error:
            log.warning("cannot remove the leftover staging folder %s: %s", root / name, error)


# -- opening dst safely --------------------------------------------------------------------


def _parts_below(home: Path, target: Path) -> tuple[str, tuple[str, ...]]:
    """Returns (the home's real path, target's components below it); refuses anything else."""
    real_home = os.path.realpath(home)
    try:
        parts = Path(target).relative_to(real_home).parts
    except ValueError:
        raise StagingError(f"{target} is not inside the home {real_home}") from None
    if any(part in ("", ".", "..") for part in parts):
        raise StagingError(f"{target} is not a plain path below {real_home}")
    return real_home, parts


def open_folder(home: Path, target: Path, *, create: bool) -> int:
    """Returns a descriptor of `target`, a folder inside `home`, reached without symlinks.

    Each component is opened with O_NOFOLLOW relative to the previous one, so a symlink
    anywhere on the way (even one swapped in a moment ago) raises StagingError instead of
    leading outside the home. With `create`, missing folders are made (mode 0755) and,
    when the service is root, given the home's owner.
    """
    real_home, parts = _parts_below(home, target)
    current = os.open(real_home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        owner = os.fstat(current)
        walked = Path(real_home)
        for part in parts:
            walked /= part
            made = False
            for _ in range(_ATTEMPTS):
                try:
                    following = os.open(part, _DIRECTORY_FLAGS, dir_fd=current)
                    break
                except FileNotFoundError:
                    if not create:
                        raise StagingError(f"{walked} no longer exists") from None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=current)
                        made = True
                except OSError as error:
                    if error.errno in _SWAPPED:
                        raise StagingError(
                            f"{walked} is not a folder (a symlink or a file is in the way)"
                        ) from None
                    raise
            else:
                raise StagingError(f"{walked} keeps changing: cannot open it")
            os.close(current)
            current = following
            if made and os.geteuid() == 0:
                os.fchown(current, owner.st_uid, owner.st_gid)
        return current
    except BaseException:
        os.close(current)
        raise


# -- moving the staged tree into dst --------------------------------------------------------


def _copy_xattrs(source: int, target: int) -> None:
    """Copies extended attributes between descriptors, as far as the file systems allow."""
    try:
        names = os.listxattr(source)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            os.setxattr(target, name, os.getxattr(source, name))


def _copy_bytes(source: int, target: int) -> None:
    offset = 0
    try:
        while True:
            sent = os.sendfile(target, source, offset, _COPY_CHUNK)
            if sent == 0:
                return
            offset += sent
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
            raise
    while chunk := os.read(source, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view) :]


def _remove_tree(parent: int, name: str, device: int) -> None:
    """Removes the folder `name` of `parent` with everything in it, on `device` only.

    Like shutil.rmtree by descriptor (a symlink is removed, never followed), but it refuses
    to enter another file system: a folder mounted in a home is never emptied.
    """
    folder = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    try:
        if os.fstat(folder).st_dev != device:
            raise OSError(errno.EXDEV, "a mount point is in the way", name)
        for entry in os.listdir(folder):
            kind = os.stat(entry, dir_fd=folder, follow_symlinks=False).st_mode
            if stat.S_ISDIR(kind):
                _remove_tree(folder, entry, device)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=folder)
    finally:
        os.close(folder)
    os.rmdir(name, dir_fd=parent)


class _Merger:
    """Moves (or copies, across file systems) staged entries into an open dst folder."""

    def __init__(self, *, copy: bool, overwrite: Overwrite = Overwrite.ALWAYS) -> None:
        self.copy = copy
        self.overwrite = overwrite
        self.root = os.geteuid() == 0
        self.failures: list[str] = []
        self.failure_count = 0

    def merge(self, source: int, target: int, where: Path) -> None:
        """Puts every entry of the `source` folder into the `target` folder."""
        for name in sorted(os.listdir(source)):
            try:
                self._place(source, target, name, where / name)
            except OSError as error:
                self.failure_count += 1
                if len(self.failures) < _FAILURES_NAMED:
                    self.failures.append(f"{where / name}: {error.strerror or error}")

    def _place(self, source: int, target: int, name: str, path: Path) -> None:
        staged = os.stat(name, dir_fd=source, follow_symlinks=False)
        for _ in range(_ATTEMPTS):
            try:
                there: os.stat_result | None = os.stat(name, dir_fd=target, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            keep = there is not None and self._keeps(there, staged)
            if (
                there is not None
                and stat.S_ISDIR(there.st_mode)
                and stat.S_ISDIR(staged.st_mode)
                and self._merge_folder(source, target, name, staged, path, keep=keep)
            ):
                return
            if keep:
                return  # the overwrite policy keeps what dst has (the staged copy goes)
            if there is not None and (stat.S_ISDIR(there.st_mode) or stat.S_ISDIR(staged.st_mode)):
                self._remove(target, name)
            try:
                self._move(source, target, name, staged, path)
                return
            except OSError as error:
                if error.errno not in _RACED:
                    raise
        raise StagingError(f"{path} keeps changing while the restore puts files there")

    def _keeps(self, there: os.stat_result, staged: os.stat_result) -> bool:
        """Returns True when the overwrite policy keeps the entry `there` in dst."""
        if self.overwrite is Overwrite.NEVER:
            return True
        if self.overwrite is Overwrite.IF_NEWER:
            return there.st_mtime_ns >= staged.st_mtime_ns
        return False

    def _merge_folder(
        self,
        source: int,
        target: int,
        name: str,
        staged: os.stat_result,
        path: Path,
        *,
        keep: bool = False,
    ) -> bool:
        """Merges a staged folder into dst's folder of the same name (which keeps its own
        metadata with `keep`); False if it was swapped."""
        try:
            inner_target = os.open(name, _DIRECTORY_FLAGS, dir_fd=target)
        except OSError as error:
            if error.errno in (*_SWAPPED, errno.ENOENT):
                return False  # a symlink or file took the folder's place: replace it
            raise
        try:
            self._unlock_staged(source, name, staged)
            inner_source = os.open(name, _DIRECTORY_FLAGS, dir_fd=source)
            try:
                self.merge(inner_source, inner_target, path)
                if not keep:
                    self._set_metadata(inner_source, inner_target, staged)
            finally:
                os.close(inner_source)
        finally:
            os.close(inner_target)
        return True

    @staticmethod
    def _remove(target: int, name: str) -> None:
        """Removes whatever is at `name` in the target folder, never following a symlink."""
        try:
            os.unlink(name, dir_fd=target)
        except FileNotFoundError:
            pass
        except (IsADirectoryError, PermissionError) as error:
            # Linux says EISDIR when unlink(2) meets a folder (EPERM elsewhere).
            there = os.stat(name, dir_fd=target, follow_symlinks=False)
            if not stat.S_ISDIR(there.st_mode):
                raise error from None
            _remove_tree(target, name, os.fstat(target).st_dev)

    def _move(
        self, source: int, target: int, name: str, staged: os.stat_result, path: Path
    ) -> None:
        if not self.copy:
            # A folder moves only if its owner may write it (rename updates its `..`).
            moved = -1
            if stat.S_ISDIR(staged.st_mode) and self._unlock_staged(source, name, staged):
                moved = os.open(name, _DIRECTORY_FLAGS, dir_fd=source)
            try:
                os.rename(name, name, src_dir_fd=source, dst_dir_fd=target)
                if moved >= 0:
                    os.fchmod(moved, stat.S_IMODE(staged.st_mode))  # the mode restic gave it
                return
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                log.info("restore staging is on another file system than %s: copying", path)
                self.copy = True
            finally:
                if moved >= 0:
                    os.close(moved)
        self._copy(source, target, name, staged, path)

    def _unlock_staged(self, source: int, name: str, staged: os.stat_result) -> bool:
        """Gives the service's own user full access to a staged entry; True if it had to.

        Needed only when the service is not root: restic restored the entry's own mode
        (a read-only folder, a 000 file) and the move or copy needs to read or write it.
        The staging folder is the service's alone, so a change by name is safe there.
        """
        if self.root or staged.st_mode & 0o700 == 0o700 or stat.S_ISLNK(staged.st_mode):
            return False
        os.chmod(name, stat.S_IMODE(staged.st_mode) | 0o700, dir_fd=source)
        return True

    def _copy(
        self, source: int, target: int, name: str, staged: os.stat_result, path: Path
    ) -> None:
        mode = staged.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=target)
            if not self._merge_folder(source, target, name, staged, path):
                raise OSError(errno.ELOOP, "replaced while being restored")
        elif stat.S_ISREG(mode):
            self._copy_file(source, target, name, staged)
        elif stat.S_ISLNK(mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=target)
            os.symlink(os.readlink(name, dir_fd=source), name, dir_fd=target)
            self._set_link_metadata(target, name, staged)
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=target)
            # Not opened to set the mode (opening a device runs its driver): the mode is
            # the one given here, less the umask.
            os.mknod(name, mode, staged.st_rdev, dir_fd=target)
            self._set_link_metadata(target, name, staged)
        else:
            log.info("restore: %s is a socket or unknown kind: not copied", path)

    def _copy_file(self, source: int, target: int, name: str, staged: os.stat_result) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=target)
        self._unlock_staged(source, name, staged)
        reading = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=source)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            writing = os.open(name, flags, 0o600, dir_fd=target)
            try:
                _copy_bytes(reading, writing)
                self._set_metadata(reading, writing, staged)
            finally:
                os.close(writing)
        finally:
            os.close(reading)

    def _set_metadata(self, source: int, target: int, staged: os.stat_result) -> None:
        """Gives the entry open as `target` the staged entry's xattrs, owner, mode and times."""
        try:
            if self.root:
                os.fchown(target, staged.st_uid, staged.st_gid)
            os.fchmod(target, stat.S_IMODE(staged.st_mode))  # after fchown, which clears setuid
            _copy_xattrs(source, target)  # after fchown, which drops file capabilities
            os.utime(target, ns=(staged.st_atime_ns, staged.st_mtime_ns))
        except PermissionError:
            if self.root:
                raise  # not root: a folder of someone else's keeps its own metadata

    def _set_link_metadata(self, target: int, name: str, staged: os.stat_result) -> None:
        if self.root:
            os.chown(name, staged.st_uid, staged.st_gid, dir_fd=target, follow_symlinks=False)
        os.utime(
            name,
            ns=(staged.st_atime_ns, staged.st_mtime_ns),
            dir_fd=target,
            follow_symlinks=False,
        )


def merge_into(
    staging: Path,
    home: Path,
    target: Path,
    *,
    copy: bool = False,
    overwrite: Overwrite = Overwrite.ALWAYS,
) -> None:
    """Moves everything in `staging` into the folder `target` inside `home`.

        `target` is made if missing (owned like the home); it is reached from the home without
        following symlinks. Entries are renamed into place, or copied when the two are on
        different file systems (`copy=True` copies from the start); what dst already has follows
    `overwrite` (see the module). Raises StagingError when
        `target` cannot be reached or some entries could not be placed (the rest are placed).
    """
    destination = open_folder(home, target, create=True)
    try:
        source = os.open(staging, _DIRECTORY_FLAGS)
        try:
            merger = _Merger(copy=copy, overwrite=overwrite)
            merger.merge(source, destination, target)
        finally:
            os.close(source)
    finally:
        os.close(destination)
    if merger.failure_count:
        named = "; ".join(merger.failures)
        raise StagingError(
            f"{merger.failure_count} restored item(s) could not be put in {target}: {named}"
        )


def merge_and_remove(
    staging: Path, home: Path, target: Path, overwrite: Overwrite = Overwrite.ALWAYS
) -> None:
    """merge_into, then removes the staging folder whatever happened."""
    try:
        merge_into(staging, home, target, overwrite=overwrite)
    except RecursionError:
        raise StagingError(f"restored files could not be put in {target}: too deep") from None
    except OSError as error:
        if isinstance(error, StagingError):
            raise
        raise StagingError(
            f"restored files could not be put in {target}: {error.strerror or error}"
        ) from None
    finally:
        remove_staging(staging)


# -- the async part -----------------------------------------------------------------------


async def _to_the_end(work: Callable[[], T]) -> T:
    """Runs `work` in a thread and waits for it even if cancelled meanwhile (then re-raises)."""
    task = asyncio.ensure_future(asyncio.to_thread(work))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
        except BaseException:
            if cancelled:
                raise asyncio.CancelledError from None
            raise
    if cancelled:
        raise asyncio.CancelledError
    return result


async def staged_restore(
    data_root: Path,
    restore_id: int,
    home: Path,
    target: Path,
    restore: Callable[[Path], Awaitable[T]],
    *,
    active: Collection[int] = (),
    overwrite: Overwrite = Overwrite.ALWAYS,
) -> T:
    """Runs `restore(staging)`, then moves what it restored into `target` (see the module).

    What was restored is moved into `target` also when `restore` fails or is cancelled;
    the staging folder is always removed. Leftover staging folders of restores not in
    `active` (the ids of the other running restores) are removed first. Files already in
    `target` follow `overwrite`. Raises what
    `restore` raised, or StagingError.
    """
    # A staging folder of this very restore is a killed attempt's: it goes too.
    await asyncio.to_thread(sweep_staging, data_root, set(active) - {restore_id})
    staging = make_staging(data_root, restore_id)  # a few system calls: no await, no leak
    try:
        result = await restore(staging)
    except BaseException:
        try:
            await _to_the_end(lambda: merge_and_remove(staging, home, target, overwrite))
        except StagingError as error:
            log.warning("restore %d: %s", restore_id, error)
        raise
    await _to_the_end(lambda: merge_and_remove(staging, home, target, overwrite))
    return result
