"""ecfs.core: the bottom layer, importing no other ecfs package.

Errors (each carries its errno), the data model (typed ids, frozen
records), geometry (all offset arithmetic), the codec (the only zfec
user), the fragment format (the only xxhash user), units, block-aligned
buffers, trio task helpers, and facts about the host (mount table,
drop_caches). Nothing here touches a store or the metadata database.
"""
