"""Where the repository is, taken out of restic's texts before a user or an anonymous caller
sees them (SPEC §9: `healthz` and a user's job `extra` name no backend account, host or
repository path; admins and the log keep the detail).

Pure functions over strings: `redact(text, repository_url)` replaces the configured
repository and the forms restic prints of it with `<repository>`, and host names and
addresses with `<host>`. restic prints the repository as configured, with a password in
the URL masked (`rest:http://fauser:***@host:8000/repo/`, even `http://:***@host` with no
user), with a trailing slash added (rest), without its backend prefix inside HTTP errors
(`Head "http://fauser:***@host:8000/repo/config"`), and files below it
(`stat /var/repo/config`). Anything that still looks like a backend URL, an HTTP URL, a
network address or a lock holder's machine is replaced too, so a form restic spells
differently tomorrow is still covered by the generic patterns.
"""

from __future__ import annotations

import re
from functools import lru_cache

REPOSITORY = "<repository>"
HOST = "<host>"

BACKEND_PREFIXES = ("rest:", "sftp:", "s3:", "rclone:", "b2:", "azure:", "gs:", "swift:")
_LOCAL_PREFIX = "local:"

# Characters a printed path or URL runs over; quotes, spaces and brackets end it.
_RUN = r"[^\s\"'`<>()\[\]{}]*"
# Punctuation that ends a sentence rather than a path: given back after the replacement.
_TRAILING = re.compile(r"[:,;.!?]+$")

_GENERIC: tuple[tuple[re.Pattern[str], str], ...] = (
    # Backend URLs restic prints (`rest:http://...`, `s3:http://...`, `sftp:user@host:/path`).
    (re.compile(r"\b(?:rest|sftp|s3|rclone|b2|azure|gs|swift):" + r"[^\s\"'`<>]+"), REPOSITORY),
    # HTTP(S) URLs inside Go's errors (`Head "http://user:***@host:8000/repo/config"`).
    (re.compile(r"\bhttps?://" + _RUN), REPOSITORY),
    # Go's network errors: `dial tcp 127.0.0.1:8000`, `lookup host.example on 10.0.0.53:53`.
    (re.compile(r"\b(dial (?:tcp|udp)[46]?) (?!<)\S+?(?=:\s|\s|$)"), rf"\1 {HOST}"),
    (re.compile(r"\blookup (?!<)[^\s:]+"), f"lookup {HOST}"),
    (re.compile(r"(\blookup <host> on) \S+?(?=:\s|\s|$)"), rf"\1 {HOST}"),
    # ssh, for sftp: `connect to host 127.0.0.1 port 22`.
    (re.compile(r"\bconnect to host \S+"), f"connect to host {HOST}"),
    # A lock's holder: `locked exclusively by PID 9510 on vm by root (UID 0, GID 0)`.
    (re.compile(r"\bon \S+ by \S+ \(UID \d+, GID \d+\)"), f"on {HOST}"),
    # Any IPv4 address (with a port) left over, e.g. a DNS server's.
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), HOST),
)


def _masked(url: str) -> str:
    """Returns `url` with the password in `user:password@` as `***`, as restic prints it."""
    return re.sub(r"(://[^/@\s]*?:)[^/@\s]*@", r"\1***@", url)


def repository_forms(repository_url: str) -> tuple[str, ...]:
    """Returns the texts that name the repository `repository_url`, longest first.

    The URL as configured and as restic prints it (password masked, trailing slash
    optional), its HTTP URL without the backend prefix, and for a local repository the
    folder with and without `local:`.
    """
    url = repository_url.strip()
    if not url:
        return ()
    forms: set[str] = set()
    for text in (url, _masked(url)):
        forms.add(text)
        for prefix in (*BACKEND_PREFIXES, _LOCAL_PREFIX):
            if text.startswith(prefix):
                inner = text.removeprefix(prefix)
                # `rest:http://host/repo` is printed as is; its HTTP errors show the bare URL.
                if inner.startswith(("http://", "https://")) or prefix == _LOCAL_PREFIX:
                    forms.add(inner)
    for text in list(forms):
        forms.add(text.rstrip("/") or text)
    forms.discard("")
    return tuple(sorted(forms, key=len, reverse=True))


@lru_cache(maxsize=8)
def _pattern(repository_url: str) -> re.Pattern[str] | None:
    forms = repository_forms(repository_url)
    if not forms:
        return None
    # A form must end where a name ends (`/var/repo` is not `/var/repo-old`); what follows
    # it up to a space or quote is below the repository (`/var/repo/config`) and goes too.
    alternatives = "|".join(re.escape(form.rstrip("/") or form) for form in forms)
    return re.compile(rf"(?:{alternatives})(?![\w-]|\.\w){_RUN}")


def _replace_keeping_punctuation(match: re.Match[str], placeholder: str) -> str:
    trailing = _TRAILING.search(match.group(0))
    return placeholder + (trailing.group(0) if trailing else "")


def redact(text: str, repository_url: str) -> str:
    """Returns `text` with the repository as `<repository>` and hosts as `<host>`.

    `repository_url` is the configured one (it may hold a password; restic masks it).
    """
    pattern = _pattern(repository_url)
    if pattern is not None:
        text = pattern.sub(lambda match: _replace_keeping_punctuation(match, REPOSITORY), text)
    for generic, replacement in _GENERIC:
        if replacement == REPOSITORY:
            text = generic.sub(lambda match: _replace_keeping_punctuation(match, REPOSITORY), text)
        else:
            text = generic.sub(replacement, text)
    return text
