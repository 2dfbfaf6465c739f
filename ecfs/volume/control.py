"""Talking to a running mount: status snapshots and operator commands.

How the CLI reaches a mount: through virtual extended attributes of the
mount's root directory, served by the daemon itself (no socket to secure
or clean up, and the kernel tells the daemon who asks):

* getxattr(MOUNTPOINT, "user.ecfs.status") -> the volume's status record
  (`Volume.status()`) as JSON (`ecfs.volume.status.to_json`; the CLI parses it
  back with `ecfs.volume.status.from_json`);
* getxattr(MOUNTPOINT, "user.ecfs.iostat") -> the cheap counters-only
  snapshot (`Volume.iostat()`, no query over the chunk table) as JSON
  (`ecfs.volume.status.iostat_to_json` / `iostat_from_json`), what
  `ecfs iostat` polls every interval;
* getxattr(MOUNTPOINT, "user.ecfs.pid") -> the daemon's pid;
* getxattr(MOUNTPOINT, "user.ecfs.workdir") -> the daemon's working
  directory, where it leaves a report if its shutdown fails (`ecfs umount`
  reads it: see volume.SHUTDOWN_REPORT);
* setxattr(MOUNTPOINT, "user.ecfs.control", COMMAND) runs a command:
  "scrub [MAX_SECONDS]", "scrub-stop", "repair urgent|normal [min=BYTES]
  [max=BYTES]" (with the repair's minimum and maximum rates for the rest
  of the mount, see `ecfs.data.repair`),
  "store-replace OLD NEW", "store-add NEW [spread|hybrid]" (with a placement
  policy to switch to), "store-remove OLD", "pause [WHO]" (pause all
  background work, persisted until "resume"; WHO: who asked, e.g.
  user@host, shown in the status), "resume",
  "store-domain OLD [LABEL]" (set
  a store's failure domain label; without LABEL, back to its default).
  store-replace and store-add also take "--domain=LABEL" (the new store's
  label) and "--allow-shared-domains" (see `ecfs.volume.store_admin`).

Only root and the user who mounted may use them (checked in `fs`).
Every argument is validated before anything starts (`parse_command`):
scrub seconds finite and positive, store paths absolute and non-empty; a
refused command answers EINVAL and is logged with the reason.
Owns: the control channel's commands and their parsing. Must not: know
the volume (the volume runs a parsed `Command`, `Volume.run_command`; the
status is the volume's own record), or contain the logic of repair, scrub
or store management.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shlex
from dataclasses import dataclass

from ..core.errors import FsError, VolumeError
from ..data.placement import POLICIES
from ..storage.domains import check_label
from ..storage.s3store import S3Location, is_s3_location

log = logging.getLogger(__name__)


#: Longest scrub duration accepted (seconds; ~31 years: "no limit" is no argument).
MAX_SCRUB_SECONDS = 1e9
#: Longest WHO of "pause WHO" (printable text, shown in the status).
MAX_WHO = 200
#: How a store is named in store-replace OLD / store-remove OLD besides a
#: path: its index in the store table, or its store id (a UUID in hex).
_STORE_INDEX = re.compile(r"[0-9]{1,9}")
_STORE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Command:
    """One validated control command.

    verb: "scrub" (seconds: a limit, or None), "scrub-stop", "repair"
    (urgent; min_rate, max_rate: bytes/s to set, or None), "store-replace" (old, new), "store-add" (new, placement: a
    policy to switch to, or None), "store-remove" (old), "pause" (by: who
    asked, or ""), "resume", "store-domain"
    (old, domain: a label or None for the default). `new` is always an
    absolute path or an s3:// location; `old` that, a store index or a
    store id. `domain`: the new store's label (replace, add);
    `allow_shared`: accept a new store sharing a failure domain."""

    verb: str
    seconds: float | None = None
    urgent: bool = False
    old: str | None = None
    new: str | None = None
    placement: str | None = None
    by: str = ""
    domain: str | None = None
    allow_shared: bool = False
    min_rate: int | None = None
    max_rate: int | None = None


def parse_command(text: str) -> Command:
    """The command in `text`; FsError (EINVAL) naming what is wrong for
    anything else. Pure: never touches the file system (a path may lie on
    this very mount, whose requests wait for the event loop that parses)."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise _refused(text, f"cannot split it into words: {exc}") from None
    if not words:
        raise _refused(text, "it is empty")
    verb, args = words[0], words[1:]
    domain, allow_shared = None, False
    if verb in ("store-replace", "store-add"):
        for word in [w for w in args if w.startswith("--")]:
            args.remove(word)
            if word == "--allow-shared-domains":
                allow_shared = True
            elif word.startswith("--domain="):
                domain = _label(text, word.removeprefix("--domain="))
            else:
                raise _refused(text, f"unknown option {word!r}")
    arity = {"scrub": (0, 1), "scrub-stop": (0, 0), "repair": (1, 3), "store-replace": (2, 2),
             "store-add": (1, 2), "store-remove": (1, 1), "pause": (0, 1),
             "resume": (0, 0), "store-domain": (1, 2)}  # fmt: skip
    if verb not in arity:
        raise _refused(text, f"unknown command {verb!r}")
    low, high = arity[verb]
    if not low <= len(args) <= high:
        raise _refused(text, f"{verb} takes {low}..{high} arguments, not {len(args)}")
    if verb == "scrub":
        return Command(verb, seconds=_seconds(text, args[0]) if args else None)
    if verb == "repair":
        if args[0] not in ("urgent", "normal"):
            raise _refused(text, "repair takes 'urgent' or 'normal'")
        rates: dict[str, int] = {}
        for word in args[1:]:
            name, _, value = word.partition("=")
            if name not in ("min", "max") or name in rates or not re.fullmatch(r"[0-9]{1,18}", value):
                raise _refused(text, f"{word!r} is not min=BYTES or max=BYTES (bytes per second)")
            rates[name] = int(value)
        return Command(
            verb, urgent=args[0] == "urgent", min_rate=rates.get("min"), max_rate=rates.get("max")
        )
    if verb == "store-replace":
        return Command(
            verb, old=_old_store(text, args[0]), new=_new_path(text, args[1]), domain=domain,
            allow_shared=allow_shared,
        )  # fmt: skip
    if verb == "store-add":
        if len(args) > 1 and args[1] not in POLICIES:
            raise _refused(text, f"unknown placement policy {args[1]!r} (known: {', '.join(POLICIES)})")
        return Command(
            verb, new=_new_path(text, args[0]), placement=args[1] if len(args) > 1 else None,
            domain=domain, allow_shared=allow_shared,
        )  # fmt: skip
    if verb == "store-domain":
        label = _label(text, args[1]) if len(args) > 1 else None
        return Command(verb, old=_old_store(text, args[0]), domain=label)
    if verb == "store-remove":
        return Command(verb, old=_old_store(text, args[0]))
    if verb == "pause":
        by = args[0] if args else ""
        if len(by) > MAX_WHO or not by.isprintable():
            raise _refused(text, f"who paused must be printable text of at most {MAX_WHO} characters")
        return Command(verb, by=by)
    return Command(verb)


def read_command(text: str) -> Command:
    """`parse_command`, logging a refused command (the control attribute
    can only answer EINVAL; the log says why). The volume runs the command
    (`Volume.run_command`)."""
    try:
        return parse_command(text)
    except FsError as exc:
        log.warning("%s", exc)
        raise


def _refused(text: str, reason: str) -> FsError:
    return FsError(f"control command {text!r} refused: {reason}", errno=errno.EINVAL)


def _seconds(text: str, word: str) -> float:
    try:
        seconds = float(word)
    except ValueError:
        raise _refused(text, f"{word!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SCRUB_SECONDS):
        raise _refused(text, f"scrub seconds must be > 0 and <= {MAX_SCRUB_SECONDS:g}")
    return seconds


def _new_path(text: str, word: str) -> str:
    """A new store's directory: an absolute path (the daemon's working
    directory is /, so a relative one would name a directory the user never
    meant; the CLI sends absolute ones), or an s3:// location."""
    if not word:
        raise _refused(text, "the store path is empty")
    if "\0" in word:
        raise _refused(text, "the store path contains a NUL byte")
    if is_s3_location(word):  # an object store (ecfs.storage.s3store): no directory
        try:
            return str(S3Location.parse(word))
        except VolumeError as exc:
            raise _refused(text, str(exc)) from None
    if not os.path.isabs(word):
        raise _refused(text, f"the store path {word!r} is not absolute")
    return os.path.normpath(word)


def _label(text: str, word: str) -> str:
    try:
        return check_label(word)
    except VolumeError as exc:
        raise _refused(text, str(exc)) from None


def _old_store(text: str, word: str) -> str:
    if _STORE_INDEX.fullmatch(word) or _STORE_ID.fullmatch(word):
        return word
    return _new_path(text, word)
