"""ecfs.frontend: what users touch; the top layer.

The pyfuse3 operations (`fs`, the single errno boundary), the mount
daemon (`mount`), the command line (`cli`, click, no logic), its side of
the control channel (`client`), and the status as text (`render`) and as
Prometheus metrics (`metrics`).
"""
