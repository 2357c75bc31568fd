"""SQL engines: durable history and cluster presence on SQLite or PostgreSQL."""

from .history import SqlHistory
from .presence import SqlPresence

__all__ = ["SqlHistory", "SqlPresence"]
