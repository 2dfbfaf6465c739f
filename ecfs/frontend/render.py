"""Human-readable renderings of the status record (pure; no I/O).

Owns: the text `ecfs status` and `ecfs scrub` print; tables are drawn by
rich (plain text, no colour: the output is read by people and by grep).
Must not: compute anything the record does not hold.
"""

from __future__ import annotations

import io

from rich import box
from rich.console import Console
from rich.table import Table

from ..core.units import format_size
from ..data.background import BackgroundStatistics, format_time
from ..data.scrub import ScrubStatistics
from ..volume.status import EventsStatus, VolumeStatus

#: Skipped chunks `ecfs status` lists (the JSON record holds more).
SKIPPED_LISTED = 5

#: Columns rich may use: more than any table needs, so nothing is folded or
#: cut (a long store path stays whole and greppable; tables are not expanded).
WIDTH = 100_000


def render_table(table: Table, width: int = WIDTH) -> str:
    """A rich table as plain text lines (no colour, no trailing blanks)."""
    out = io.StringIO()
    # Cells are data (paths, reasons): no markup, emoji codes or highlighting.
    console = Console(
        file=out, width=width, color_system=None, force_terminal=False, markup=False,
        emoji=False, highlight=False,
    )  # fmt: skip
    console.print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def render_status(status: VolumeStatus) -> str:
    """The `ecfs status` text: volume health, stores, repair queue."""
    policy = f"  placement: {status.placement}" if status.placement != "spread" else ""
    lines = [f"volume {status.volume}  k={status.k} m={status.m}{policy}  health: {status.health}"]
    tolerance = status.tolerance
    plural = "s" if tolerance != 1 else ""
    if tolerance >= 0 and status.redundancy_warning is None:
        lines.append(f"can lose {tolerance} more store{plural} without losing data")
    elif tolerance >= 0:
        lines.append(
            f"can lose {tolerance} more failure domain{plural} without losing data"
            f" ({status.domains} domains over {len(status.stores)} stores)"
        )
    else:
        lines.append("SOME DATA IS UNREADABLE until missing stores come back")
    lines.append(render_background(status.background))
    if status.redundancy_warning is not None:
        lines.append(f"WARNING: {status.redundancy_warning}")
    lines.append("")
    stores = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ("store", "state", "p50", "p95", "queue", "errors", "fragments", "used", "free"):
        stores.add_column(name, justify="left" if name == "state" else "right")
    stores.add_column("domain", no_wrap=True)
    stores.add_column("path", no_wrap=True)
    for store in status.stores:
        path = store.path
        if store.reason and store.state == "failed":
            path += f"\nfailed: {store.reason}"
        stores.add_row(
            str(store.index),
            store.state + ("*" if store.draining else ""),
            _ms(store.latency_p50_ms),
            _ms(store.latency_p95_ms),
            str(store.in_flight),
            str(store.errors + store.timeouts),
            str(store.fragments),
            format_size(store.fragment_bytes),
            format_size(store.free_bytes) if store.free_bytes is not None else "?",
            store.domain,
            path,
        )
    lines.append(render_table(stores))
    copies = status.metadata.copies
    if copies:
        lines.append(
            "metadata copies: "
            + ", ".join(f"store {i} ({kind})" for i, kind in sorted(copies.items()))
        )
    repair = status.repair
    lines.append("")
    if repair.chunks:
        eta = repair.eta_seconds
        lines.append(
            f"repair: {repair.chunks} chunks queued, {format_size(repair.bytes_left)} to"
            f" rebuild, {format_size(repair.rate_bytes_per_s)}/s"
            + (f", about {eta} s left" if eta is not None else "")
            + (" (urgent)" if repair.urgent else "")
            + (" (paused)" if status.background.paused else "")
        )
        for reason, entry in sorted(repair.queue.items()):
            lines.append(f"  {reason:15} {entry.chunks:>8} chunks {format_size(entry.bytes):>10}")
    else:
        lines.append("repair: nothing queued")
    lines.append(
        f"  rebuilt so far: {repair.fragments_rebuilt} fragments,"
        f" {format_size(repair.bytes_written)}"
    )
    lines.append(
        "  repair pace: "
        + (f"at least {format_size(repair.min_rate)}/s under load" if repair.min_rate
           else "yields to the foreground")
        + (f", at most {format_size(repair.rate_limit)}/s" if repair.rate_limit else ", no cap")
        + " (-o repair_min_rate, repair_max_rate)"
    )  # fmt: skip
    if repair.skipped:
        lines.append(
            f"  skipped: {repair.skipped} chunks (failed or missed their deadline;"
            " retried with backoff)"
        )
        for chunk in repair.skipped_chunks[:SKIPPED_LISTED]:
            name = chunk.path or f"inode {chunk.inode} (unlinked)"
            lines.append(
                f"    {name} bytes [{chunk.start}, {chunk.stop}): {chunk.reason};"
                f" {chunk.failures} failure{'s' if chunk.failures != 1 else ''},"
                f" next try {format_time(chunk.retry_ns)}"
            )
    scrub = status.scrub
    if scrub.running:
        lines.append(f"scrub: running, {scrub.chunks_done}/{scrub.chunks_total} chunks")
    elif scrub.finished_ns:
        lines.append(
            f"scrub: last pass verified {scrub.chunks_done}/{scrub.chunks_total} chunks,"
            f" {scrub.finding_count} findings"
        )
    restripe = status.restripe
    if restripe is not None and (restripe.roots or restripe.skipped):
        lines.append(
            f"restripe: {restripe.files_done}/{restripe.files_total} files,"
            f" {restripe.chunks_done}/{restripe.chunks_total} chunks,"
            f" {format_size(restripe.bytes_done)} of {format_size(restripe.bytes_total)},"
            f" {format_size(restripe.rate_bytes_per_s)}/s"
            + (f"; {restripe.skipped} chunks skipped, to retry" if restripe.skipped else "")
        )
        for where in restripe.skipped_ranges:
            lines.append(f"  skipped: {where}")
    log = status.write_log
    lines.append(
        f"small-write log: {log.records} records, {format_size(log.bytes)} in {log.chunks}"
        f" chunks waiting to be folded; {log.folds} chunks folded since mount;"
        f" {log.segments} segments, {format_size(log.space_bytes)} on the stores"
        + (f"; {log.copies_missing} records short of m+1 copies" if log.copies_missing else "")
    )
    lease = status.lease
    if lease is not None:
        lines.append(
            f"lease: {lease.state}, host {lease.host} (pid {lease.pid}), epoch {lease.epoch},"
            f" until {lease.expires_at} UTC, on {lease.stores_held} of {lease.stores} S3 stores"
            + (f" and {lease.local_stores} local ones" if lease.local_stores else "")
            + (f" ({lease.last_error})" if lease.last_error else "")
        )
    lines.append(render_events(status.events))
    for message in status.unrecoverable:
        lines.append(f"UNRECOVERABLE: {message}")
    return "\n".join(lines)


def render_events(events: EventsStatus) -> str:
    """One line: events since mount, and the event hook's runs."""
    line = f"events: {events.emitted} since mount"
    if not events.hook:
        return line + " (logged only: no event hook)"
    return (
        f"{line}; hook {events.hook}: {events.hook_runs} runs, {events.hook_failures} failed,"
        f" {events.hook_timeouts} killed after the timeout, {events.dropped} dropped (queue full)"
    )


def render_background(background: BackgroundStatistics) -> str:
    """One line: paused on purpose (since when, by whom), or running."""
    if not background.paused:
        return "background work: running"
    by = f" by {background.by}" if background.by else ""
    return (
        f"background work: paused on purpose since {format_time(background.since_ns)}{by}"
        " (repair, scrub, restripe, folds and garbage deletion wait; `ecfs repair --resume`)"
    )


def render_scrub(scrub: ScrubStatistics) -> str:
    """The `ecfs scrub` text: what the pass verified and found."""
    lines = [
        f"scrub: verified {scrub.chunks_done} of {scrub.chunks_total} chunks"
        f" ({scrub.fragments_verified} fragments, {format_size(scrub.bytes_verified)})"
        + (", stopped early (run again to continue)" if scrub.stopped_early else ""),
        f"findings: {scrub.finding_count} chunks with missing or corrupt fragments"
        + (" (queued for repair)" if scrub.finding_count else ""),
    ]
    if scrub.findings:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for name in ("chunk", "inode", "index", "fragments"):
            table.add_column(name, justify="right" if name != "chunk" else "left")
        for finding in scrub.findings[:50]:
            table.add_row(
                f"{finding.chunk_id:016x}",
                str(finding.inode),
                str(finding.chunk_index),
                ", ".join(map(str, finding.fragments)),
            )
        lines.append(render_table(table))
    metadata = scrub.metadata_findings
    lines.append(
        f"metadata replicas: {scrub.metadata_replicas_verified} verified"
        + (f", {len(metadata)} problem(s) (bad replicas are replaced)" if metadata else "")
    )
    for problem in metadata:
        where = "working copy" if problem.store is None else f"store {problem.store}"
        lines.append(f"  {where}: {problem.problem}")
    return "\n".join(lines)
