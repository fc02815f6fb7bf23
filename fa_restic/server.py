"""`fa-restic serve`: the HTTP service, stopped cleanly by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings

import jwt
from aiohttp import web

from fa_restic.api.app import make_app
from fa_restic.api.auth import Authenticator
from fa_restic.config import Settings
from fa_restic.jobs.records import LAYOUT
from fa_restic.jobs.service import JobOptions, JobService
from fa_restic.metrics import Metrics
from fa_restic.store import Collections, StateStore, Store
from fa_restic.wiring import backups_confined, local_repository_path, make_restic

log = logging.getLogger("fa_restic")

GC_THRESHOLDS = (100_000, 50, 100)
"""A young collection every 100,000 allocations (default 700), a full one after 5,000 young
ones (default 100)."""
EXAMPLE_SECRET = "change-me"  # noqa: S105 - the example config's value, detected to warn
DEMO_USER = "demo"


async def build_app(settings: Settings) -> web.Application:
    """Returns the application for `settings` with its records loaded.

    Raises ResticError if restic is unusable, StateError if the state file is unreadable
    (with `[cluster]`: the database cannot be reached, or another node uses it).
    """
    # The state first: a file (or a database) that cannot be read stops the start before
    # anything else.
    store = _store(settings)
    collections = await store.start()
    try:
        return await _build(settings, store, collections)
    except BaseException:
        await store.stop()  # a database's pool and its one node's lock, a file's journal
        raise


def _store(settings: Settings) -> Store:
    """Returns the records' store: the state file, or with `[cluster]` the database."""
    if settings.cluster is None:
        return StateStore(settings.paths.state_file, LAYOUT)
    from fa_restic.cluster.store import DatabaseStore

    return DatabaseStore(
        settings.cluster.database_url.get_secret_value(),
        layout=LAYOUT,
        node=settings.cluster.node_name,
        lease_seconds=settings.cluster.lease_seconds,
        finished_in_memory=settings.cluster.finished_in_memory,
    )


async def _build(settings: Settings, store: Store, collections: Collections) -> web.Application:
    restic = await make_restic(settings)
    confined = await asyncio.to_thread(backups_confined, settings)
    settings.paths.data_root.mkdir(parents=True, exist_ok=True)
    options = JobOptions(
        max_running=settings.jobs.max_running,
        max_pending_per_user=settings.jobs.max_pending_per_user,
        max_attempts=settings.jobs.max_attempts,
        lock_wait_seconds=settings.jobs.lock_wait_seconds,
        prune_interval_seconds=settings.maintenance.prune_interval_seconds,
        local_repository=local_repository_path(settings),
        data_root=settings.paths.data_root,
        confine_backups=confined,
        browse_cache_bytes=settings.restic.browse_cache_bytes,
        lease_seconds=settings.cluster.lease_seconds if settings.cluster else 30.0,
    )
    coordination = getattr(store, "coordination", None)  # a cluster's database (SPEC §10)
    service = JobService(options, store, restic, Metrics(str(restic.version)), coordination)
    service.load(collections)
    # The records loaded live as long as the service: out of the garbage collector's way, so
    # that its full passes (every few hundred thousand allocations) do not walk them all.
    gc.freeze()
    # And full passes far apart: one walks every live object (0.4 s with 50,000 pending jobs
    # on this machine), and with the default thresholds a cancel-all of them triggered one,
    # holding every request meanwhile. The service makes few reference cycles.
    gc.set_threshold(*GC_THRESHOLDS)
    return make_app(service, Authenticator(settings.auth), settings.paths.data_root)


def _demo_hint(settings: Settings) -> None:
    """With the example secret, prepares a demo home and prints a curl that works."""
    if settings.auth.jwt_secret != EXAMPLE_SECRET:
        return
    folder = settings.paths.data_root / "users" / DEMO_USER / "docs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hello.txt").write_text("hello from fa-restic\n", encoding="utf-8")
    with warnings.catch_warnings():  # the example secret is short; the log already says so
        warnings.simplefilter("ignore")
        token = jwt.encode(
            {"username": DEMO_USER, "exp": int(time.time()) + 86400}, EXAMPLE_SECRET, "HS256"
        )
    base = f"http://{settings.server.host}:{settings.server.port}/fa/api/v0"
    log.warning(
        "auth.jwt_secret is the example value %r: change it before real use", EXAMPLE_SECRET
    )
    # A demo token on stdout, never in the log: only the example secret produces it.
    print(
        f"Try it (demo user {DEMO_USER!r}, token valid 24 h):\n"
        f"  TOKEN={token}\n"
        f'  curl -s -H "Authorization: Bearer $TOKEN" \\\n'
        f'       -d \'{{"id": 1, "path": "docs"}}\' {base}/backup\n'
        f'  curl -s -H "Authorization: Bearer $TOKEN" {base}/backup/1',
        flush=True,
    )


def serve(settings: Settings) -> int:
    """Serves until SIGTERM/SIGINT; returns the exit code."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    application = loop.run_until_complete(build_app(settings))
    _demo_hint(settings)
    log.info("listening on %s:%d", settings.server.host, settings.server.port)
    web.run_app(
        application,
        host=settings.server.host,
        port=settings.server.port,
        loop=loop,
        print=None,
        shutdown_timeout=2.0,
        access_log=None,
    )
    log.info("stopped")
    return 0
