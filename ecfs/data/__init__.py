"""ecfs.data: the services that turn files into fragments and back.

Imports only ecfs.core and ecfs.storage. The namespace (POSIX rules),
file data (buffers, inline files, truncate, fsync, fallocate), the reader
(healthy, hedged and degraded reads), its routing around lagging
stores (routing), the kept bytes of its degraded reads (kept) and
read-ahead, the writer and
placement, the small-write log (its policy and its segment files), repair and the one fragment rebuild,
scrub, garbage collection and damage bookkeeping, redundancy policies per
directory (policy) and their restripe. Each service has a
`statistics()` method returning a frozen record.
"""
