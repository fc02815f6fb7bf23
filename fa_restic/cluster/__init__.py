"""Many nodes, one repository (SPEC §10): the records and the scheduling primitives the
nodes share, in PostgreSQL. Not used by a single node, whose records stay in the state file."""

from fa_restic.cluster.coordination import DatabaseCoordination, NodeLease
from fa_restic.cluster.database import Database, DatabaseUnavailable
from fa_restic.cluster.records import DatabaseRecords, Job
from fa_restic.cluster.store import DatabaseInUse, DatabaseStore

__all__ = [
    "Database",
    "DatabaseCoordination",
    "DatabaseInUse",
    "DatabaseRecords",
    "DatabaseStore",
    "DatabaseUnavailable",
    "Job",
    "NodeLease",
]
