"""Human-readable renderings of status documents (pure; no I/O)."""

from __future__ import annotations

from typing import Any

from .units import format_size


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def render_status(status: dict[str, Any]) -> str:
    """The `ecfs status` text: volume health, stores, repair queue."""
    lines = []
    tolerance = status["tolerance"]
    lines.append(
        f"volume {status['volume']}  k={status['k']} m={status['m']}  health: {status['health']}"
    )
    if tolerance >= 0:
        lines.append(f"can lose {tolerance} more store{'s' if tolerance != 1 else ''} without losing data")
    else:
        lines.append("SOME DATA IS UNREADABLE until missing stores come back")
    lines.append("")
    lines.append(
        f"{'store':>5}  {'state':8} {'p50':>9} {'p95':>9} {'queue':>5} {'errors':>6}"
        f" {'fragments':>9} {'used':>10} {'free':>10}  path"
    )
    for store in status["stores"]:
        state = store["state"] + ("*" if store.get("draining") else "")
        free = format_size(store["free_bytes"]) if store["free_bytes"] is not None else "?"
        lines.append(
            f"{store['index']:>5}  {state:8} {_ms(store['latency_p50_ms']):>9}"
            f" {_ms(store['latency_p95_ms']):>9} {store['in_flight']:>5}"
            f" {store['errors'] + store['timeouts']:>6} {store['fragments']:>9}"
            f" {format_size(store['fragment_bytes']):>10} {free:>10}  {store['path']}"
        )
        if store.get("reason") and store["state"] == "failed":
            lines.append(f"{'':>7}failed: {store['reason']}")
    repair = status["repair"]
    lines.append("")
    if repair["chunks"]:
        eta = repair["eta_seconds"]
        lines.append(
            f"repair: {repair['chunks']} chunks queued, {format_size(repair['bytes_left'])} to"
            f" rebuild, {format_size(repair['rate_bytes_per_s'])}/s"
            + (f", about {eta} s left" if eta is not None else "")
            + (" (urgent)" if repair["urgent"] else "")
        )
        for reason, entry in sorted(repair["queue"].items()):
            lines.append(f"  {reason:15} {entry['chunks']:>8} chunks {format_size(entry['bytes']):>10}")
    else:
        lines.append("repair: nothing queued")
    lines.append(
        f"  rebuilt so far: {repair['fragments_rebuilt']} fragments,"
        f" {format_size(repair['bytes_written'])}"
    )
    scrub = status["scrub"]
    if scrub["running"]:
        lines.append(f"scrub: running, {scrub['chunks_done']}/{scrub['chunks_total']} chunks")
    elif scrub["finished_ns"]:
        lines.append(
            f"scrub: last pass verified {scrub['chunks_done']}/{scrub['chunks_total']} chunks,"
            f" {scrub['finding_count']} findings"
        )
    write_log = status.get("write_log")  # absent from an older daemon's status
    if write_log is not None:
        lines.append(
            f"small-write log: {write_log['records']} records,"
            f" {format_size(write_log['bytes'])} in {write_log['chunks']} chunks waiting to be"
            f" folded; {write_log['folds']} chunks folded since mount"
        )
    for message in status["unrecoverable"]:
        lines.append(f"UNRECOVERABLE: {message}")
    return "\n".join(lines)


def render_scrub(scrub: dict[str, Any]) -> str:
    lines = [
        f"scrub: verified {scrub['chunks_done']} of {scrub['chunks_total']} chunks"
        f" ({scrub['fragments_verified']} fragments, {format_size(scrub['bytes_verified'])})"
        + (", stopped early (run again to continue)" if scrub["stopped_early"] else ""),
        f"findings: {scrub['finding_count']} chunks with missing or corrupt fragments"
        + (" (queued for repair)" if scrub["finding_count"] else ""),
    ]
    for finding in scrub["findings"][:50]:
        lines.append(
            f"  chunk {finding['chunk_id']:016x} (inode {finding['inode']}, chunk"
            f" {finding['chunk_index']}): fragments {finding['fragments']}"
        )
    metadata = scrub.get("metadata_findings", [])
    lines.append(
        f"metadata replicas: {scrub.get('metadata_replicas_verified', 0)} verified"
        + (f", {len(metadata)} problem(s) (bad replicas are replaced)" if metadata else "")
    )
    for finding in metadata:
        where = "working copy" if finding["store"] is None else f"store {finding['store']}"
        lines.append(f"  {where}: {finding['problem']}")
    return "\n".join(lines)
