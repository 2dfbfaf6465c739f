"""ecfs.storage: stores and the metadata database; imports only ecfs.core.

The Store interface (fragments by name; no file descriptor crosses it),
its directory implementation with the open-file cache, the S3 object
store (s3store), the factory that opens either by location
(storefactory), in-process fakes for tests, the cache of verified fragment headers, the one helper for
blocking calls (offload), the volume lock, all SQL (metadb) and the
metadata copies on the stores (replicas). Nothing here knows files or
chunks as the services use them.
"""
