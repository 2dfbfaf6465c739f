"""ecfs: a FUSE filesystem that stores every file erasure-coded across stores.

Layers (each module imports only from its own layer or below; checked by
tests/test_layering.py):

* pure: errors, model, geometry, codec (the only zfec user), fragment (the
  only xxhash user)
* I/O boundary: offload (the one helper for blocking calls), store,
  metadb (all SQL), replicas (metadata copies on stores)
* services: placement, reader, writer, filedata, namespace, rebuild (the one
  fragment rebuild of repair and fsck --repair)
* assembly: volume, control
* adapters: fs (pyfuse3 Operations, the errno boundary), mount, cli (click)
"""

__version__ = "0.1.0"
