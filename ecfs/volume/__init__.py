"""ecfs.volume: a volume as a whole; imports core, storage and data.

`assembly.Volume` opens the stores and the metadata and runs the services
(used by the mount and the offline tools); `status` is its typed status
record; `control` parses the control channel's commands; `store_admin`
adds, replaces and removes stores of a mounted volume; `mkfs` and `fsck`
make and check a volume that is not mounted.
"""
