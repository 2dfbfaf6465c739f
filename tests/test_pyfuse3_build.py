"""The installed pyfuse3 carries ecfs's patches (scripts/pyfuse3), and the
mount says so when it does not (`ecfs.frontend.mount.check_pyfuse3`).

Without release-gil.patch a 1 MiB read reply holds the GIL while the
kernel copies it, and the reads beside a rebuild fell short of issue 17's
target (543-593 MiB/s against 630; 662-690 with it, scripts/pyfuse3/README.md);
without fallocate.patch fallocate(2) fails with EOPNOTSUPP."""

from __future__ import annotations

import logging

import pyfuse3
import pytest

from ecfs.frontend import mount


def test_the_installed_pyfuse3_has_both_patches() -> None:
    assert hasattr(pyfuse3.Operations, "fallocate")
    assert pyfuse3.ECFS_NOGIL_MIN == 64 * 1024


def test_a_patched_pyfuse3_mounts_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=mount.log.name):
        mount.check_pyfuse3()
    assert caplog.records == []


@pytest.mark.parametrize(
    ("missing", "said"),
    [
        ("ECFS_NOGIL_MIN", "copied with the GIL held"),
        ("fallocate", "no fallocate handler"),
    ],
)
def test_a_pyfuse3_without_a_patch_is_named_in_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, missing: str, said: str
) -> None:
    owner = pyfuse3.Operations if missing == "fallocate" else pyfuse3
    monkeypatch.delattr(owner, missing)
    with caplog.at_level(logging.WARNING, logger=mount.log.name):
        mount.check_pyfuse3()
    (record,) = caplog.records
    assert said in record.getMessage()
    assert "scripts/pyfuse3/install.sh" in record.getMessage()
