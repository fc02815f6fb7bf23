"""How a store says it cannot work now (the API answers 503: try again later)."""

from __future__ import annotations


class StoreUnavailable(OSError):
    """The store cannot be reached or cannot work now (a database that is down); nothing
    was changed. The message is short and names no host or account."""
