"""ecfs: a FUSE filesystem that stores every file erasure-coded across stores.

Layers (each module imports only from its own layer or below; checked by
tests/test_layering.py):

* pure: errors, model, geometry, codec (the only zfec user), fragment (the
  only xxhash user)
* I/O boundary: offload (the one helper for blocking calls), store (the
  Store interface: fragments by name, no file descriptor crosses it; the
  directory store, with its open-file cache fdcache), s3store (S3-compatible
  object stores, the only obstore user), fakestores (in-memory
  and fault-injecting stores for tests), metadb (all SQL), replicas
  (metadata copies on stores)
* services: placement, handles (verified fragment headers), reader,
  readahead, writer, filedata, namespace
* assembly: volume, control
* adapters: fs (pyfuse3 Operations, the errno boundary), mount, cli (click)
"""

__version__ = "0.1.0"
