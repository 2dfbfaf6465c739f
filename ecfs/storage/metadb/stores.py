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

    def set_param(self, key: str, value: str) -> None:
        """Set volume parameter `key` (a new key is added)."""
        self.db.write(
            "INSERT INTO volume (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def delete_param(self, key: str) -> None:
        """Remove volume parameter `key` (nothing if absent)."""
        self.db.write("DELETE FROM volume WHERE key = ?", (key,))

    def paths(self) -> dict[int, str]:
        """index -> the path the store was last seen at ('' if never)."""
        return {int(i): str(p) for i, p in self.db.query("SELECT idx, path FROM stores")}

    def set_path(self, index: int, path: str) -> None:
        self.db.write("UPDATE stores SET path = ? WHERE idx = ?", (path, index))

    def states(self) -> dict[int, str]:
        """index -> 'active' or 'draining'."""
        return {int(i): str(s) for i, s in self.db.query("SELECT idx, state FROM stores")}

    def replace(self, index: int, store_id: str) -> None:
        """Store `index` is now the store with id `store_id` (a new disk)."""
        self.db.write("UPDATE stores SET store_id = ?, state = 'active' WHERE idx = ?", (store_id, index))

    def add(self, store_id: str) -> int:
        """Add a store; returns its new index."""
        index = int(self.db.query_value("SELECT COALESCE(MAX(idx), -1) + 1 FROM stores"))
        self.db.write("INSERT INTO stores (idx, store_id) VALUES (?, ?)", (index, store_id))
        return index

    def set_state(self, index: int, state: str) -> None:
        self.db.write("UPDATE stores SET state = ? WHERE idx = ?", (state, index))

    def remove(self, index: int) -> None:
        self.db.write("DELETE FROM stores WHERE idx = ?", (index,))

    def chunks_on(self, index: int) -> int:
        """How many chunks still have a fragment on store `index`."""
        return sum(
            1 for (stores,) in self.db.query("SELECT stores FROM chunks") if index in stores
        )
