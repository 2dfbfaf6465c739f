"""All SQL of ecfs: the metadata schema and the queries on it.

* `schema`: the tables (documented column by column) and volume creation.
* `database`: the working-copy connection, transactions and their write log.
* `inodes`: inodes, directory entries, symlinks, xattrs.
* `chunks`: chunk maps (each chunk's own coding), fragment locations, the
  repair queue.
* `restripe`: pending restripe work and the files below a directory.
* `tallies`: the chunk table's redundancy classes and the repair queue's
  known damage, which every status reads, kept current by TEMP triggers.
* `digest`: the content digest every copy records (row hashes kept current
  by TEMP triggers on the working copy) and the per-table digests.
"""
