"""SQL for the volume's store table and parameters."""

from __future__ import annotations

from .database import Database


class StoreTable:
    """The `stores` and `volume` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> list[tuple[int, str]]:
        """(index, store_id) of every store, by index."""
        return [(int(i), str(s)) for i, s in self.db.query("SELECT idx, store_id FROM stores ORDER BY idx")]

    def params(self) -> dict[str, str]:
        """The volume parameters (key -> text value)."""
        return {str(k): str(v) for k, v in self.db.query("SELECT key, value FROM volume")}
