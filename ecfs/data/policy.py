"""Redundancy per directory: policies, and a file's effective coding.

Owns: the policy of a directory (the xattr ``user.ecfs.policy``, value
"K+M", e.g. "8+3", "2+2", "1+2" = three copies), parsing and checking one
(`parse_policy`, `policy_problem`), the virtual read-only xattr
``user.ecfs.policy.effective`` (a JSON description of the effective
policy of any inode, for `ecfs policy get`), and resolving the coding new
chunks of a file get (`Policies.coding_of`). Must not: write chunks, talk
to stores, or know FUSE (the namespace calls the hooks below; the CLI is a
thin wrapper over the xattrs through the mount).

Semantics. A policy is set on a directory only. The effective policy of
an inode is that of the nearest directory with a policy on its path to
the root: itself (a directory), its parent, and so on up to the root;
the volume's k+m when none has one. It is resolved when a chunk is
written, from where the file is NOW: new chunks of a file always get its
current effective policy, existing chunks keep the coding they were
written with until `ecfs restripe` converts them. So moving a file or a
directory into a tree with another policy changes the coding of what is
written from then on, and `ecfs restripe` on the new place converts the
rest; nothing is re-encoded behind the user's back. A file with several
hard links follows the directory of one of its links (the first
recorded); an unlinked but open file follows the root's policy.

Stored as an ordinary xattr row (replicated, in the digest, copied by
`cp -a` and `rsync -X` like any xattr); checked when set: K in 1..MAX_K, M
in 1..MAX_M, K+M <= MAX_N, and K+M at most the number of the volume's
active stores (every fragment of a chunk goes to its own store), else
EINVAL with the reason logged (and printed by `ecfs policy set`, which
checks first with the same `policy_problem`).

Concurrency: everything runs on the event loop. Two caches: directory ->
its effective policy (emptied by any change that can alter one: a policy
set or removed, a directory moved: `changed`) and file -> the coding of
its new chunks (an entry dropped when that file moves: `moved`), so a
file's first chunk costs one parent lookup, not a walk to the root.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable

from ..core.errors import FsError
from ..core.geometry import MAX_K, MAX_M, MAX_N
from ..storage.metadb.inodes import InodeTable
from ..storage.metadb.schema import ROOT_INODE

#: The xattr that holds a directory's policy ("K+M").
POLICY_XATTR = b"user.ecfs.policy"
#: Virtual, read-only: the effective policy of an inode, as JSON
#: {"k", "m", "source" (the path of the directory that set it, or null for
#: the volume's default), "volume" ("K+M"), "stores" (active stores)}.
EFFECTIVE_XATTR = b"user.ecfs.policy.effective"
#: Virtual, write-only, root or the mounting user only: setting it (any
#: value) on a directory or file starts `ecfs restripe` of it
#: (`ecfs.data.restripe`; served by the FUSE adapter, never stored).
RESTRIPE_XATTR = b"user.ecfs.restripe"

#: Resolved inodes kept before the cache starts over.
CACHE_MAX = 1 << 16
#: Deepest directory chain walked (a loop in a damaged database ends here).
MAX_DEPTH = 4096

_POLICY = re.compile(r"\s*([0-9]{1,3})\s*\+\s*([0-9]{1,3})\s*")


def parse_policy(text: str | bytes) -> tuple[int, int]:
    """(k, m) of a policy written "K+M"; ValueError naming what is wrong."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    found = _POLICY.fullmatch(text)
    if found is None:
        raise ValueError(f"policy {text!r} is not K+M (e.g. 8+3, 2+2, 1+2)")
    return int(found[1]), int(found[2])


def policy_problem(k: int, m: int, active_stores: int) -> str | None:
    """Why coding k+m cannot be used now (None if it can)."""
    if not 1 <= k <= MAX_K:
        return f"K (data fragments) must be between 1 and {MAX_K}, got {k}"
    if not 1 <= m <= MAX_M:
        return f"M (parity fragments) must be between 1 and {MAX_M}, got {m}"
    if k + m > MAX_N:
        return f"K+M must be at most {MAX_N}, got {k + m}"
    if k + m > active_stores:
        return (
            f"{k}+{m} needs {k + m} stores (one per fragment of a chunk),"
            f" the volume has {active_stores} active"
        )
    return None


class Policies:
    """Per-directory policies of one volume (see the module docstring)."""

    def __init__(
        self, table: InodeTable, k: int, m: int, active_stores: Callable[[], int]
    ) -> None:
        self.table = table
        self.k = k
        self.m = m
        self.active_stores = active_stores
        self._files: dict[int, tuple[int, int] | None] = {}
        self._dirs: dict[int, tuple[int, int, int | None]] = {}

    def changed(self) -> None:
        """A policy was set or removed: forget what was resolved."""
        self._files.clear()
        self._dirs.clear()

    def moved(self, ino: int, is_dir: bool) -> None:
        """Inode `ino` was renamed (moved, replaced or exchanged)."""
        if is_dir:
            self.changed()
        else:
            self._files.pop(ino, None)

    def checked_value(self, is_dir: bool, value: bytes) -> bytes:
        """The value to store for a policy set to `value` (normalised
        "K+M"); FsError (EINVAL) with the reason if it is refused."""
        if not is_dir:
            raise FsError("a redundancy policy can be set on directories only", errno=errno.EINVAL)
        try:
            k, m = parse_policy(value)
        except ValueError as exc:
            raise FsError(str(exc), errno=errno.EINVAL) from None
        problem = policy_problem(k, m, self.active_stores())
        if problem is not None:
            raise FsError(f"policy {k}+{m} refused: {problem}", errno=errno.EINVAL)
        return f"{k}+{m}".encode()

    def widest(self) -> int:
        """The largest K+M of any directory's policy (0 without one): a
        store removal must leave at least that many stores."""
        widest = 0
        for value in self.table.xattr_values(POLICY_XATTR):
            try:
                k, m = parse_policy(value)
            except ValueError:
                continue
            widest = max(widest, k + m)
        return widest

    def effective(self, ino: int) -> tuple[int, int, int | None]:
        """(k, m, directory that set it, or None for the volume's default)."""
        node: int | None = ino
        seen_root = False
        walked: list[int] = []
        found: tuple[int, int, int | None] = (self.k, self.m, None)
        for _ in range(MAX_DEPTH):
            if node is None:
                if seen_root:
                    break
                node = ROOT_INODE  # an unlinked inode: the root's policy
            cached = self._dirs.get(node)
            if cached is not None:
                found = cached
                break
            seen_root = seen_root or node == ROOT_INODE
            walked.append(node)
            value = self.table.get_xattr(node, POLICY_XATTR)
            if value is not None:
                try:
                    k, m = parse_policy(value)
                except ValueError:
                    pass  # not ours to judge here (fsck's xattrs are raw): ignored
                else:
                    found = (k, m, node)
                    break
            node = None if node == ROOT_INODE else self.table.parent_of(node)
        if len(self._dirs) >= CACHE_MAX:
            self._dirs.clear()
        for directory in walked[1:]:  # every node above the first is a directory
            self._dirs[directory] = found
        return found

    def coding_of(self, ino: int) -> tuple[int, int] | None:
        """The coding new chunks of file `ino` get: (k', m'), or None for
        the volume's own. Cached (see `changed`)."""
        try:
            return self._files[ino]
        except KeyError:
            pass
        k, m, _ = self.effective(ino)
        coding = None if (k, m) == (self.k, self.m) else (k, m)
        if len(self._files) >= CACHE_MAX:
            self._files.clear()
        self._files[ino] = coding
        return coding

    def describe(self, ino: int) -> bytes:
        """The value of EFFECTIVE_XATTR for `ino` (see there)."""
        k, m, source = self.effective(ino)
        where = None
        if source is not None:
            paths = self.table.paths_of(source, ROOT_INODE, limit=1)
            where = os.fsdecode(paths[0]) if paths else f"(inode {source})"
        document = {
            "k": k, "m": m, "source": where, "volume": f"{self.k}+{self.m}",
            "stores": self.active_stores(),
        }  # fmt: skip
        return json.dumps(document, sort_keys=True).encode()
