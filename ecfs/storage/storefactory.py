"""Opening a store by its location: the one place that turns a location
given by a user (a directory, or an ``s3://`` location) into a `Store`.

Owns: `open_store` and `initialise_store`, which pick the implementation
by the location's form. Must not: do I/O of its own (`initialise_store`
runs the chosen store's own initialisation, which blocks), or know a
store's layout. It imports both `ecfs.storage.store` and
`ecfs.storage.s3store`, which builds on `store`; keeping the dispatch here
keeps `store` free of any import of `s3store` (no import cycle).

Concurrency: plain functions, no state.
"""

from __future__ import annotations

import os

from .s3store import S3Store, is_s3_location
from .store import DirectoryStore, Store, StoreMarker


def open_store(location: str | os.PathLike[str]) -> Store:
    """The store at `location`, without I/O: an object store for an
    ``s3://`` location (`ecfs.storage.s3store`), else a directory."""
    if is_s3_location(location):
        return S3Store(location)
    return DirectoryStore(location)


def initialise_store(location: str | os.PathLike[str], marker: StoreMarker) -> Store:
    """Create a new, empty store at `location` for `marker` (mkfs, store
    add/replace). Blocking; see `DirectoryStore.initialise` and
    `S3Store.initialise` for the errors."""
    if is_s3_location(location):
        return S3Store.initialise(location, marker)
    return DirectoryStore.initialise(location, marker)
