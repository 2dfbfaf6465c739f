"""The man pages in man/: roff generated from the commands' --help plus the
hand-written sections kept here.

    python -m ecfs.manpages            # rewrite man/*.8 from the CLI
    python -m ecfs.manpages --check    # exit 1 if a committed page is stale

Owns: the page list, the hand-written text, and its rendering to roff
(man(7) macros only: .TH .SH .SS .PP .TP .IP .RS/.RE .nf/.fi, so that
groff, mandoc and man-db all render it). Must not: import click. What the
commands' --help says comes in as plain data from `ecfs.cli.help_texts()`
(see there for its shape); `render_pages` is pure, only `main` touches files.

Hand-written text uses a small markup, rendered by `_blocks`: paragraphs
separated by blank lines; `code` is bold, *WORD* italic; a block indented
by four spaces is shown verbatim (examples); a block whose first line ends
with "::" is a tagged paragraph (the term, then its explanation); lines
starting with "- " are bullet items.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .metrics import METRICS

MAN_DIR = Path(__file__).resolve().parent.parent / "man"
SECTION = "8"


@dataclass(frozen=True)
class Page:
    """One man page: `commands` whose --help it shows (the first one names
    the page), a one-line `summary` for NAME, and hand-written `sections`
    (title -> markup) placed after OPTIONS, in order."""

    name: str
    commands: tuple[str, ...]
    summary: str
    description: str = ""
    sections: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Hand-written text shared by several pages

_EXIT_USAGE = """\
2::
Usage error or refused request: a bad option or argument, a path that is not
what the command needs. The reason is one line on standard error, starting
with `ecfs:`."""

_SEE_ALSO_ALL = (
    "ecfs", "ecfs-mkfs", "ecfs-mount", "ecfs-umount", "ecfs-status",
    "ecfs-scrub", "ecfs-repair", "ecfs-fsck", "ecfs-store",
)  # fmt: skip

_PROGRESS = """\
On a terminal, progress is drawn as a bar on standard error; when standard
error is not a terminal (cron, systemd, a pipe) nothing but the result is
printed."""

_STORE_FILES = """\
*STORE*`/ecfs-store.json`::
The store's marker: the volume id, this store's id, k and m. A directory
without it is not a store. A store whose marker is unreadable, names
another volume than most stores given, or disagrees with the volume's k, m
or sizes is left out (it counts as missing; at most m may be). While
mounted, the marker and the store directory itself are checked again: a
store swapped underneath (a disk gone, its empty mountpoint left behind)
is marked failed, with the reason in `ecfs status`, until it is back.
Stores are local directories: an argument like `s3://...` is refused.

*STORE*`/frags/`::
Fragment files, one per chunk and store.

*STORE*`/meta/`::
A copy of the metadata (a SQLite database, `ecfs-meta.sqlite`), on m+1 of
the stores. A copy that was refused (damaged, edited, of another volume)
is kept beside it as `ecfs-meta.sqlite.refused` when it is rewritten;
ecfs never reads it again."""


def _control_files() -> str:
    return """\
*MOUNTPOINT* (extended attributes `user.ecfs.status`, `user.ecfs.pid`, `user.ecfs.control`)::
How commands talk to a running mount: the daemon serves them on the mount's
root directory; only root and the user who mounted may use them."""


PAGES: tuple[Page, ...] = (
    Page(
        "ecfs",
        ("ecfs",),
        "erasure-coded FUSE filesystem over several disks",
        description="""\
ecfs joins several directories, ideally one per disk (the *stores*), into one
filesystem. Every file is cut into chunks; each chunk is encoded into k data
and m parity *fragments*, written to k+m different stores. Any k fragments
rebuild the chunk, so the volume loses no data while at most m stores are
missing or broken, and reads keep working meanwhile: ecfs decodes only the
byte range a program asked for, from the same range of the surviving
fragments.

Every fragment carries a checksum per cell (4 KiB by default): a read
verifies the cells it touches and never returns wrong bytes; a bad or
missing fragment is queued for the background repair, which rebuilds it
when the volume is idle. A chunk is never overwritten in place (a rewrite
writes a new version), so a crash cannot leave a chunk half old, half new.
The metadata (names, attributes, where each fragment lives) is a SQLite
database kept on m+1 stores.

A small overwrite (a database page, say) that is flushed or fsync'd is not
worth re-encoding a whole chunk: its bytes are kept as a checksummed record
written to m+1 stores (the *small-write log*, in `wlog/` segment files),
which costs kilobytes, and reads lay the records over the chunk. A background task later folds a
chunk's records into one new chunk version: when they reach a quarter of
the chunk, when the chunk was not written for a few seconds, and at
unmount.""",
        sections={
            "CONCEPTS": """\
store::
A directory holding a marker file (`ecfs-store.json`), fragment files and,
on m+1 stores, a copy of the metadata. Put each store on its own disk:
two stores on one disk are lost together.

k, m::
Data and parity fragments per chunk, chosen at `ecfs mkfs`. Space used is
(k+m)/k times the file size; any m stores may be lost.

chunk, fragment, cell::
A chunk holds up to k times the fragment size (128 KiB) of a file; a
fragment is one of its k+m coded pieces; a cell is the checksum unit
inside a fragment.

tolerance::
How many more stores the volume can lose now: m on a healthy volume,
less while fragments are missing and not yet rebuilt (`ecfs status`).""",
            "WHEN A DISK DIES": """\
Reads and writes go on: reads decode from the surviving fragments, new
chunks are written to the stores that remain. `ecfs status` shows the
store as failed and the tolerance one lower. If the store stays failed
for `rebuild_after` seconds (mount option, 15 minutes by default) and
another store has room, its fragments are rebuilt there. To put a new
disk in its place:

    ecfs store replace /mnt/pool /srv/d3/ecfs /srv/d7/ecfs
    ecfs repair --wait /mnt/pool

and use the new store path from the next mount on.""",
            "SHELL COMPLETION": """\
Bash and zsh complete commands, options and paths. Add one line to
`~/.bashrc` or `~/.zshrc`:

    eval "$(_ECFS_COMPLETE=bash_source ecfs)"
    eval "$(_ECFS_COMPLETE=zsh_source ecfs)"

or, to avoid running ecfs at each shell start, save the script once:

    _ECFS_COMPLETE=bash_source ecfs > /etc/bash_completion.d/ecfs""",
            "EXIT STATUS": """\
0::
Success.

1::
The operation failed, or found problems (see each command).

"""
            + _EXIT_USAGE,
            "ENVIRONMENT": """\
`_ECFS_COMPLETE`::
`bash_source` or `zsh_source`: print the shell completion script and exit.

`XDG_STATE_HOME`::
Where a mount started by a user other than root logs by default
(`$XDG_STATE_HOME/ecfs/mount.log`, else `~/.local/state/ecfs/mount.log`).

`ECFS`::
The command the mount helper `mount.fuse.ecfs` runs (default: the `ecfs`
installed next to it, else the one in `PATH`).""",
        },
    ),
    Page(
        "ecfs-mkfs",
        ("ecfs mkfs",),
        "create an ecfs volume",
        description="""\
Each store should be a directory on a different disk: the volume survives
the loss of any m stores only if one disk failing takes at most one store
with it. A store may be a new path (it is created) or an empty directory.
There may be more than k+m stores: each chunk's fragments go to k+m of
them, those with the most free space.

Choosing k and m: m is how many disks may fail at once (2 is the usual
choice for 6 to 12 disks); the space overhead is (k+m)/k, so larger k
wastes less space, but a degraded read then reads from more disks.
Sizes take the suffixes K, M, G (powers of two).""",
        sections={
            "EXAMPLES": """\
A 4+2 volume over six disks (1.5 times the space, any 2 disks may fail):

    ecfs mkfs --data 4 --parity 2 \\
        /srv/d1/ecfs /srv/d2/ecfs /srv/d3/ecfs \\
        /srv/d4/ecfs /srv/d5/ecfs /srv/d6/ecfs

An 8+3 volume over eleven disks:

    ecfs mkfs -k 8 -m 3 /srv/disk{01..11}/ecfs""",
            "EXIT STATUS": """\
0::
The volume was created; its id is printed.

1::
Writing a store failed.

"""
            + _EXIT_USAGE
            + """ For example: fewer than k+m stores, a directory
that is not empty or belongs to another volume, the same directory given
twice, a bad size.""",
            "FILES": _STORE_FILES,
        },
    ),
    Page(
        "ecfs-mount",
        ("ecfs mount",),
        "mount an ecfs volume",
        description="""\
The stores may be given in any order, as paths or as glob patterns (quote
them, so that ecfs expands them, not the shell); up to m of them may be
missing. `ecfs mount` returns once the filesystem answers; the daemon runs
in the background until the volume is unmounted, and logs to `--log-file`.
A volume is served by one daemon at a time: the stores are locked.""",
        sections={
            "MOUNT OPTIONS": """\
`allow_other`, `noallow_other`::
Whether users other than the one who mounted may use the filesystem.
Default: `allow_other` when mounted by root, else `noallow_other`. A user
other than root needs a line `user_allow_other` in `/etc/fuse.conf` for
`allow_other`. Permissions are always checked by the kernel
(`default_permissions`).

`ro`, `rw`, `noatime`, `relatime`, `atime`, `nosuid`, `suid`, `nodev`, `dev`, `noexec`, `exec`::
As for any filesystem (see mount(8)).

`fsname=`*NAME*::
The source shown in the mount table (default `ecfs`).

`repair_rate=`*SIZE*::
Cap background repair at *SIZE* bytes per second (e.g. `50M`; default 0, no
cap: repair runs only while the volume is idle anyway, or at full speed
after `ecfs repair`).

`rebuild_after=`*SECONDS*::
How long a store may stay failed before all its fragments are rebuilt on
other stores (default 900).

`_netdev`, `nofail`, `auto`, `noauto`, `user`, `users`, `defaults`, `x-`*...*, `comment=`*...*::
Meant for mount(8), fstab(5) and systemd; ecfs accepts and ignores them.
Any other option is refused.

`remount`::
With `ro` or `rw` (and `noatime`, `nosuid`, `nodev`, `noexec` and the like):
change those flags of the ecfs mount on *MOUNTPOINT* (the stores are
ignored), as `mount -o remount,ro` *MOUNTPOINT* does through the helper.
Root only. The kernel enforces read-only (writes fail with EROFS); the
daemon keeps running, and what it had buffered is still written back.
Other options cannot change while mounted and are ignored on a remount.""",
            "FILESYSTEM SEMANTICS": """\
Timestamps are kept in nanoseconds in a signed 64-bit number, which covers
1677-09-21 to 2262-04-11 UTC. A time set outside that range (`touch -d`,
utimensat(2)) is clamped to it, as ext4 clamps to its own range: it is
stored as the nearest end and reads back so (a regular file may show the
time as set until the kernel drops it from its cache). Change times come from the
same clock the kernel stamps its own times with (CLOCK_REALTIME_COARSE)
and never go backwards while mounted.

Extended attributes: the `user.`, `trusted.` and `security.` namespaces are
stored (the kernel checks who may set the latter two). `system.` attributes
are refused with EOPNOTSUPP: ecfs implements none of them, in particular no
POSIX ACLs (permissions are the mode bits, checked by the kernel), so
setfacl(1) and `cp -a` fall back to the mode. A name may have 255 bytes, a
value 64 KiB (E2BIG beyond), and all attributes of one file together
128 KiB (ENOSPC beyond).

File handles (name_to_handle_at(2), open_by_handle_at(2)) stay valid while
the file exists, also after the kernel dropped it from its caches, and
become stale (ESTALE) once it is removed. The largest file size is
2^63-1 bytes.""",
            "MOUNT HELPER AND FSTAB": """\
With the helper `mount.fuse.ecfs` installed in `/sbin` (`scripts/install.sh`
does it when run as root), mount(8) mounts ecfs volumes like any other
filesystem. The source is a glob pattern or a list of store paths separated
by `:` or `,`:

    mount -t fuse.ecfs '/srv/d*/ecfs' /mnt/pool -o noatime

An `/etc/fstab` line (`nofail` lets the boot go on without it;
`x-systemd.requires-mounts-for=` orders it after the disks holding the
stores):

    /srv/d*/ecfs  /mnt/pool  fuse.ecfs  noatime,_netdev,nofail,x-systemd.requires-mounts-for=/srv  0  0

The helper runs `ecfs mount -o `*OPTIONS* *STORES...* *MOUNTPOINT*, with
the stores taken from the source (`$ECFS` names the ecfs command and
`$ECFS_LOG_FILE` the log file, if set). It exits 0 when mounted, 1 when
called wrongly and 32 when the mount failed, as mount(8) expects.

Its companion `umount.fuse.ecfs` makes umount(8) run `ecfs umount`, which
waits until the daemon has written everything back. umount(8) runs it when
it reads the mount table, that is for mounts it recorded options of (such
as `_netdev`); otherwise it detaches the mount itself and the daemon
finishes writing back on its own a moment later. `scripts/systemd/` has an
example `.mount` unit, and a service and timer for a weekly scrub.""",
            "DIRECT I/O": """\
Files may be opened with `O_DIRECT`. Linux's FUSE module does not drop the
pages that a buffered reader cached while an asynchronous direct write
(io_submit(2)) was in flight, so a reader could see the old bytes
afterwards (any FUSE filesystem with a kernel page cache shows this). ecfs
drops the cached pages of a file at every open after a direct writer
opened it: a buffered open after an asynchronous direct write reads the
new bytes. A reader that keeps its file open across such a write may still
read pages cached during it; synchronous direct writes are not affected.""",
            "EXAMPLES": """\
    ecfs mount '/srv/d*/ecfs' /mnt/pool
    ecfs mount -o noatime,repair_rate=100M /srv/d1/ecfs /srv/d2/ecfs ... /mnt/pool
    ecfs mount --foreground --log-level debug '/srv/d*/ecfs' /mnt/pool""",
            "EXIT STATUS": """\
0::
The volume is mounted (with `--foreground`: it was mounted, then unmounted
cleanly).

1::
Mounting failed (see the log).

"""
            + _EXIT_USAGE
            + """ For example: the mountpoint does not exist or is
already a mount point, stores of different volumes, more than m stores
missing, the volume is mounted elsewhere, an unknown option, `/dev/fuse`
missing, `allow_other` not permitted.""",
            "FILES": """\
`/var/log/ecfs/mount.log`, `~/.local/state/ecfs/mount.log`::
The daemon's log when mounted by root, or by another user, without
`--log-file`. Created mode 0600 (and made so if others could read it);
a file given with `--log-file` is created 0600 too.

`/etc/fuse.conf`::
`user_allow_other` lets users other than root mount with `allow_other`.

`/sbin/mount.fuse.ecfs`, `/sbin/umount.fuse.ecfs`::
The helpers mount(8) and umount(8) run for type `fuse.ecfs`.

"""
            + _STORE_FILES,
            "SEE ALSO": "mount(8), fstab(5), systemd.mount(5), fuse(8)",
        },
    ),
    Page(
        "ecfs-umount",
        ("ecfs umount",),
        "unmount an ecfs volume and wait until its data is durable",
        description="""\
`fusermount3 -u` and umount(8) return as soon as the kernel has detached
the mount, while the daemon may still be writing back; a shutdown or a
disk unplugged at that moment loses the last writes. `ecfs umount` waits
until the daemon has written everything, made the metadata durable on its
stores and exited. With `umount.fuse.ecfs` installed (see ecfs-mount(8)),
umount(8) does the same.

A mount whose daemon was killed is detached (the volume stays consistent:
what was fsync'ed is there, the rest is as of an earlier state).

If chunks still wait in the repair queue (for example written with reduced
redundancy while a store was full or away), `ecfs umount` says how many
on standard error and still exits 0: nothing is lost, they stay queued and
the next mount repairs them, and `ecfs fsck` reports them as warnings. To
unmount at full redundancy, run `ecfs repair --wait` first.""",
        sections={
            "EXAMPLES": """\
    ecfs umount /mnt/pool""",
            "EXIT STATUS": """\
0::
Unmounted, and the daemon exited (also when chunks still wait for repair,
see above).

1::
The mount is busy (a file is open or a process has its working directory
in it; see fuser(1)), the daemon did not finish within `--timeout`, or the
daemon could not write everything back (it says what failed, and its log
says more; metadata that could not be made durable is kept in the
directory named).

"""
            + _EXIT_USAGE
            + " For example: *MOUNTPOINT* is not an ecfs mount.",
        },
    ),
    Page(
        "ecfs-status",
        ("ecfs status",),
        "show the health of a mounted ecfs volume",
        description="""\
The health is one of:

healthy::
Every store answers and nothing is queued for repair.

degraded::
A store is missing, or fragments are queued for repair; the volume can
still lose at least one more store.

at-risk::
Some chunk has exactly k good fragments left: one more lost store loses
data. Replace the missing store now.

data-loss::
Some chunks have fewer than k good fragments: reads of them fail with EIO
until enough stores come back.""",
        sections={
            "JSON OUTPUT": """\
`--json` prints the status document the daemon keeps. These keys are
stable (new keys may be added):

`volume`, `k`, `m`::
The volume id (32 hex digits) and its code.

`health`, `tolerance`::
As above; `tolerance` is how many more stores the worst chunk can lose
(negative: data unreadable now).

`stores`::
One object per store: `index`, `path`, `state` (`ok`, `slow`, `failed`,
`missing`: part of the volume but not found at mount, or left out for its
marker), `reason` (why a store is `failed` or `missing`, e.g. the store was
swapped underneath the mount; null otherwise), `in_flight`, `errors`, `timeouts`, `latency_p50_ms`, `latency_p95_ms`,
`bytes_read`, `bytes_written`, `free_bytes`, `total_bytes` (null when
unknown), `fragments`, `fragment_bytes`, `draining`.

`repair`::
`queue` ({reason: {`chunks`, `bytes`}}, reasons `degraded-read`, `write`,
`scrub`, `store-failed`, `store-replaced`), `chunks`, `bytes_left`,
`rate_bytes_per_s`, `rate_limit`, `eta_seconds` (null when idle), `urgent`,
`busy`, `deferred`, and the counters `fragments_rebuilt`,
`chunks_repaired`, `chunks_checked_fine`, `bytes_read`, `bytes_written`,
`unrecoverable`.

`scrub`::
The current or last scrub, as printed by `ecfs scrub --json` (see
ecfs-scrub(8)).

`reads`::
Counters: `requested_bytes`, `store_bytes`, `degraded_reads`,
`degraded_requested_bytes`, `degraded_store_bytes`, `hedged_reads`,
`unrecoverable_reads`, `nowait_hits`, `thread_reads`, `one_call_reads`
(degraded reads done as one worker-thread call: k reads and the decode).

`writes`::
`bytes_in` (written by programs), `bytes_out` (written to stores).

`write_log`::
The small-write log: `records` and `bytes` waiting to be folded, `chunks`
holding them, `limit` (log bytes past which writers fold first), and the
counters `records_written`, `bytes_written`, `folds` (chunks re-encoded
with their records) and `forced_folds` (of them, folds a writer waited for);
`segments` and `space_bytes` (log segment files on the stores),
`disk_bytes_written` (record copies written, with headers and padding),
`copies_missing` (records with fewer than m+1 copies on usable stores) and
`copies_made` (copies re-created since the mount).

`metadata`::
`generation`, `durable_generation`, `live_replicas` (store indexes),
`stale_replicas` ({store: reason}).

`store_change`::
The last `ecfs store` operation: `state` (`running`, `done`, `failed`) and
`message`; empty if none.

`unrecoverable`::
Messages naming data that cannot be recovered.""",
            "METRICS": "@METRICS@",
            "EXAMPLES": """\
    ecfs status /mnt/pool
    ecfs status --json /mnt/pool | jq .tolerance

For the node_exporter textfile collector, from a timer or cron every minute:

    ecfs status --prometheus /mnt/pool > /var/lib/node_exporter/ecfs.prom.tmp &&
        mv /var/lib/node_exporter/ecfs.prom.tmp /var/lib/node_exporter/ecfs.prom""",
            "EXIT STATUS": """\
0::
The volume is healthy (with `--prometheus`: the mount answered).

1::
The volume is not healthy, or the daemon did not answer.

"""
            + _EXIT_USAGE
            + " For example: *MOUNTPOINT* is not a mounted ecfs volume.",
            "FILES": _control_files(),
        },
    ),
    Page(
        "ecfs-scrub",
        ("ecfs scrub",),
        "verify every fragment of a mounted ecfs volume",
        description="""\
Reads do not look at fragments they do not need, so a disk can rot
silently where nothing was read for months. A scrub reads every fragment
of every chunk, verifies every cell checksum, and queues each chunk with a
missing or corrupt fragment for repair. Chunks verified longest ago come
first, so a scrub stopped by `--max-duration` resumes where it stopped.
The scrub runs in the daemon; foreground I/O goes first. Small-write log
records are rows of the metadata, not fragments: each is checked against
its checksum whenever it is read, a lost or damaged metadata copy is
rebuilt from the others at mount, and `ecfs fsck` checks them all.

Each pass first verifies every metadata replica while the volume stays in
use: its schema, and every row against the content digest the replica
records. A bad replica is dropped and replaced by a fresh copy of the
mount's metadata (on its own store when that store is healthy). The
mount's working copy of the metadata is verified the same way.

"""
        + _PROGRESS,
        sections={
            "SCHEDULE": """\
Scrub every month or so. `scripts/systemd/ecfs-scrub@.service` and
`ecfs-scrub@.timer` do it weekly for a mountpoint (the instance is the
escaped path, see systemd-escape(1)):

    systemctl enable --now ecfs-scrub@$(systemd-escape -p /mnt/pool).timer

or with cron, at most 6 hours each Sunday night:

    0 1 * * 0  root  ecfs scrub --max-duration 6h /mnt/pool""",
            "JSON OUTPUT": """\
`--json` prints an object with these stable keys: `running`,
`chunks_total`, `chunks_done`, `fragments_verified`, `bytes_verified`,
`finding_count`, `findings` (list of {`chunk_id`, `inode`, `chunk_index`,
`fragments`}), `started_ns`, `finished_ns` (nanoseconds since the epoch),
`stopped_early`, `metadata_replicas_verified` (metadata replicas found
good), `metadata_findings` (list of {`store`, `problem`}: replicas found
bad or unreadable, bad ones are replaced; `store` null: the mount's own
working copy, which a remount restores from the replicas).""",
            "EXIT STATUS": """\
0::
Nothing was found.

1::
Missing or corrupt fragments were found (and queued for repair), or a bad
metadata replica (replaced).

"""
            + _EXIT_USAGE,
            "SEE ALSO": "ecfs-repair(8), ecfs-fsck(8)",
        },
    ),
    Page(
        "ecfs-repair",
        ("ecfs repair",),
        "rebuild lost fragments of a mounted ecfs volume now",
        description="""\
Lost or corrupt fragments are queued for repair when a degraded read, a
write to a missing store, a scrub or a store change finds them; the queue
is kept in the metadata and survives a crash or unmount. The background
repair rebuilds only the missing fragments of each queued chunk, most
endangered chunks first, and normally only while the volume is idle (at
most `repair_rate`, see ecfs-mount(8)). `ecfs repair` makes it urgent: full
speed, even while files are used, until `--normal`.

"""
        + _PROGRESS,
        sections={
            "EXAMPLES": """\
    ecfs repair --wait /mnt/pool
    ecfs repair --normal /mnt/pool""",
            "EXIT STATUS": """\
0::
Done (with `--wait`: nothing left that can be repaired now).

1::
Some data cannot be recovered: fewer than k good fragments are left.

"""
            + _EXIT_USAGE,
        },
    ),
    Page(
        "ecfs-fsck",
        ("ecfs fsck",),
        "check and repair an unmounted ecfs volume",
        description="""\
fsck checks, one check per invariant: `replicas_agree` (the metadata
copies), `namespace_consistent` (directories, link counts, reachable
inodes), `repair_queue_valid`, `write_log_valid` (every copy of every
small-write log record on the stores is read; a torn or damaged copy is a
warning, since it is never applied; each live record, one over its
chunk's current version, must have m+1 copies on distinct stores, which
`--repair` writes), `chunk_fragments_present` (each fragment
exists and its header matches; with `--verify-data`, every cell checksum
too) and `no_orphan_fragments`. With `--repair` it fixes what it finds:
rebuilds fragments, deletes orphans, resyncs replicas, fixes link counts.
It refuses a volume that is mounted (the stores are locked).

The metadata copies are checked as a mount checks them: schema (no
unknown table, index, view or trigger), volume, stores, and every row
against the content digest the copy records. A copy that fails is
refused (the finding says why); of the others the freshest wins, and
copies at that generation with different contents are decided by
majority. With a tie nothing is checked or repaired. Repair rewrites
refused copies from the chosen one (the refused file is kept as
`ecfs-meta.sqlite.refused`), and deletes no orphan fragment while the
copies disagree: run `fsck --repair` again once they agree.

"""
        + _PROGRESS,
        sections={
            "JSON OUTPUT": """\
`--json` prints an object with these stable keys: `volume`, `clean`,
`exit_status`, `repair`, `verify_data`, `findings` (list of {`check`,
`severity` (`error` or `warning`), `message`, `fixed`}), `unrecoverable`
(list of {`inode`, `paths`, `start`, `end`, `chunk_id`}: file byte ranges
that cannot be read), `counts` (`stores`, `stores_missing`, `replicas`,
`replicas_written`, `inodes`, `chunks`, `fragments_checked`,
`bytes_verified`, `fragments_rebuilt`, `orphan_fragments`,
`orphans_deleted`, `inodes_freed`, `write_log_records`: small-write log
records checked).""",
            "EXAMPLES": """\
    ecfs fsck '/srv/d*/ecfs'
    ecfs fsck --verify-data --repair '/srv/d*/ecfs'""",
            "EXIT STATUS": """\
0::
The volume is clean (warnings do not count: stray files in a store;
missing or bad fragments of a chunk that the volume's repair queue already
holds, e.g. one written with reduced redundancy while a store was full,
which the next mount repairs (`ecfs repair --wait` before unmounting
avoids them); orphan fragments the volume remembers to delete, left on a
store that was away, which the next mount deletes).

1::
Problems were found (fixed or not; the report says which).

"""
            + _EXIT_USAGE
            + " For example: the volume is mounted, stores of two volumes.",
            "FILES": _STORE_FILES
            + """

`$TMPDIR/ecfs-`*PID*`-fsck-`*XXXX*`/`::
fsck's working copy of the metadata while it runs. Left behind by a
killed fsck; the next fsck or mount removes those whose process is gone.""",
        },
    ),
    Page(
        "ecfs-store",
        ("ecfs store", "ecfs store replace", "ecfs store add", "ecfs store remove"),
        "replace, add or remove a store of a mounted ecfs volume",
        description="""\
Store changes run in the daemon while the volume stays in use; the
command follows them until done. After a change, mount with the new list
of stores (a glob that matches the new ones keeps working).

"""
        + _PROGRESS,
        sections={
            "EXAMPLES": """\
Replace a dead disk: mount the new disk, then

    mkdir /srv/d7/ecfs
    ecfs store replace /mnt/pool /srv/d3/ecfs /srv/d7/ecfs
    ecfs repair --wait /mnt/pool

Grow the volume by one disk, or drain one before taking it out:

    ecfs store add /mnt/pool /srv/d8/ecfs
    ecfs store remove /mnt/pool /srv/d2/ecfs""",
            "EXIT STATUS": """\
0::
Done.

1::
The change failed (the message says why; the volume is unchanged).

"""
            + _EXIT_USAGE,
        },
    ),
)


# --------------------------------------------------------------------------
# Rendering


def render_pages(help_texts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """File name ("ecfs-mount.8") -> roff text, for every page in PAGES."""
    return {f"{page.name}.{SECTION}": render_page(page, help_texts) for page in PAGES}


def render_page(page: Page, help_texts: dict[str, dict[str, Any]]) -> str:
    main = help_texts[page.commands[0]]
    out = [
        f'.TH "{page.name.upper()}" "{SECTION}" "" "ecfs {__version__}" "ecfs manual"',
        ".nh",  # no hyphenation: option names must stay whole
        ".ad l",
        ".SH NAME",
        f"{_escape(page.name, hyphens=True)} \\- {_escape(page.summary)}",
        ".SH SYNOPSIS",
    ]
    for i, command in enumerate(page.commands):
        if i:
            out.append(".br")
        out.extend(_synopsis(help_texts[command]["usage"]))
    out.append(".SH DESCRIPTION")
    out.extend(_click_help(main["help"]))
    if page.description:
        out.extend(_blocks(page.description))
    if main["commands"]:
        out.append(".SH COMMANDS")
        for name, short in main["commands"]:
            full = f"{page.commands[0]} {name}"
            own_page = _page_of(full)
            ref = f" See {own_page}({SECTION})." if own_page and own_page != page.name else ""
            out.append(".TP")
            out.append(f"\\fB{_escape(full)}\\fR")
            out.append(_inline(short) + _inline(ref))
    if main["options"]:
        out.append(".SH OPTIONS")
        out.extend(_options(main["options"]))
    for command in page.commands[1:]:
        sub = help_texts[command]
        out.append(f'.SS "{_escape(command)}"')
        out.extend(_click_help(sub["help"]))
        options = [o for o in sub["options"] if not o[0].startswith("-h, --help")]
        if options:
            out.append(".PP")
            out.append("Options:")
            out.extend(_options(options))
    for title, text in page.sections.items():
        out.append(f".SH {title}")
        if text == "@METRICS@":
            out.extend(_metrics_section())
        elif title == "SEE ALSO":
            out.append(_see_also(page, text))
        else:
            out.extend(_blocks(text))
    if "SEE ALSO" not in page.sections:
        out.append(".SH SEE ALSO")
        out.append(_see_also(page, ""))
    return "\n".join(out) + "\n"


def _page_of(command: str) -> str | None:
    for page in PAGES:
        if command in page.commands:
            return page.name
    return None


def _see_also(page: Page, extra: str) -> str:
    refs = [f"\\fB{_escape(name)}\\fR({SECTION})" for name in _SEE_ALSO_ALL if name != page.name]
    if extra:
        refs.extend(
            re.sub(r"^([\w.-]+)\((\d)\)$", lambda m: f"\\fB{_escape(m[1])}\\fR({m[2]})", ref)
            for ref in (r.strip() for r in extra.split(","))
        )
    return ", ".join(refs)


def _synopsis(usage: str) -> list[str]:
    """ "ecfs mount [OPTIONS] STORES... MOUNTPOINT" -> bold command words,
    italic metavariables."""
    words = usage.split()
    command = [w for w in words if re.fullmatch(r"[a-z][a-z0-9-]*", w)]
    rest = words[len(command) :]
    line = " ".join(re.sub(r"([A-Z][A-Z_]+)", r"\\fI\1\\fR", _escape(w)) for w in rest)
    return [f".B {_escape(' '.join(command))}", line] if line else [f".B {' '.join(command)}"]


def _options(records: Iterable[Sequence[str]]) -> list[str]:
    out = []
    for terms, help_text in records:
        out.append(".TP")
        out.append(_option_term(terms))
        out.append(_inline(help_text) if help_text else "")
        if not help_text:
            out.pop()
    return out


def _option_term(terms: str) -> str:
    """ "-k, --data INTEGER" -> bold flags, italic metavariable."""
    parts = []
    for part in terms.split(", "):
        flag, _, metavar = part.partition(" ")
        text = f"\\fB{_escape(flag, hyphens=True)}\\fR"
        if metavar:
            text += f" \\fI{_escape(metavar, hyphens=True)}\\fR"
        parts.append(text)
    return ", ".join(parts)


def _click_help(text: str) -> list[str]:
    """A docstring as click shows it: paragraphs filled, except a paragraph
    that starts with a line "\\b", whose lines are kept."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = paragraph.splitlines()
        if lines and lines[0].strip() == "\b":
            out.append(".PP")
            out.append(".nf")
            out.extend(_escape_line(_inline_code(line)) for line in lines[1:])
            out.append(".fi")
        elif paragraph.strip():
            out.append(".PP")
            out.append(_inline(" ".join(line.strip() for line in lines)))
    return out


def _blocks(text: str) -> list[str]:
    """Render the hand-written markup (see the module docstring)."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = block.splitlines()
        if all(line.startswith("    ") for line in lines):
            out += [".PP", ".RS 4", ".nf"]
            out += [_escape_line(_escape(line[4:], hyphens=True)) for line in lines]
            out += [".fi", ".RE"]
        elif lines[0].endswith("::"):
            out.append(".TP")
            out.append(_inline(lines[0][:-2]))
            out.append(_inline(" ".join(lines[1:])))
        elif lines[0].startswith("- "):
            items: list[list[str]] = []
            for line in lines:
                if line.startswith("- "):
                    items.append([line[2:]])
                else:
                    items[-1].append(line.strip())
            for item in items:
                out += [".IP \\(bu 2", _inline(" ".join(item))]
        else:
            out.append(".PP")
            out.append(_inline(" ".join(line.strip() for line in lines)))
    return out


def _metrics_section() -> list[str]:
    out = _blocks("""\
`--prometheus` prints the status document as Prometheus text (exposition
format 0.0.4). Labels: `store` is the store index, `reason` a repair
reason (see JSON OUTPUT). The metrics:""")
    for metric in METRICS:
        labels = "{" + ",".join(metric.labels) + "}" if metric.labels else ""
        out.append(".TP")
        out.append(f"\\fB{_escape(metric.name)}\\fR{_escape(labels)} ({metric.type})")
        out.append(_inline(metric.help))
    return out


def _escape(text: str, hyphens: bool = False) -> str:
    """Text -> roff: backslashes doubled; with `hyphens`, every '-' becomes
    '\\-' (a real minus, so that options can be copied), otherwise only a
    '-' that starts a word."""
    text = text.replace("\\", "\\e")
    if hyphens:
        return text.replace("-", "\\-")
    return re.sub(r"(?<![\w-])-+", lambda m: m[0].replace("-", "\\-"), text)


def _inline_code(text: str) -> str:
    return _escape(text, hyphens=True)


def _inline(text: str) -> str:
    """Markup -> roff on one line: `code` bold, *WORD* italic."""
    pieces = re.split(r"(`[^`]+`|\*[^*\s][^*]*\*)", text)
    out = []
    for piece in pieces:
        if piece.startswith("`") and piece.endswith("`") and len(piece) > 1:
            out.append(f"\\fB{_escape(piece[1:-1], hyphens=True)}\\fR")
        elif piece.startswith("*") and piece.endswith("*") and len(piece) > 2:
            out.append(f"\\fI{_escape(piece[1:-1], hyphens=True)}\\fR")
        else:
            out.append(_escape(piece))
    return _escape_line("".join(out))


def _escape_line(line: str) -> str:
    """A text line must not start with a control character (. or ')."""
    return "\\&" + line if line.startswith((".", "'")) else line


# --------------------------------------------------------------------------
# Files


def stale_pages(directory: Path, pages: dict[str, str]) -> list[str]:
    """Names of pages whose file in `directory` is missing or differs, and
    of *.8 files there that no page generates."""
    stale = [
        name
        for name, text in pages.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
    stale += sorted(p.name for p in directory.glob(f"*.{SECTION}") if p.name not in pages)
    return stale


def main(argv: Sequence[str] = ()) -> int:
    """Write the pages into man/ (or with --check, report stale ones)."""
    from .cli import help_texts  # cli owns click; this module never imports it

    pages = render_pages(help_texts())
    if "--check" in argv:
        stale = stale_pages(MAN_DIR, pages)
        for name in stale:
            print(f"man/{name} is out of date: run python -m ecfs.manpages", file=sys.stderr)
        return 1 if stale else 0
    MAN_DIR.mkdir(exist_ok=True)
    for name, text in pages.items():
        path = MAN_DIR / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote man/{name}")
    for name in stale_pages(MAN_DIR, pages):
        if name not in pages:
            (MAN_DIR / name).unlink()
            print(f"removed man/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
