"""Shared fixtures: real mounted volumes, and the safety net that makes sure
no test run leaves a FUSE mount behind.

* `volume`: a fresh 6-store k=4 m=2 volume, mounted for one test, its log
  checked for errors at teardown. A test that expects errors in the log says
  so with `@pytest.mark.allow_log(r"regex", ...)`.
* `shared_volume`: the same, shared by the tests of one module (faster; tests
  on it must not depend on each other and should work in their own directory).

Tests that use either fixture get the `mount` marker automatically, so
`pytest -m "not mount"` runs the unit tests only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import FUSE_MISSING_REASON, MountedVolume, cleanup_leftovers, mounted_volume

MOUNT_FIXTURES = {"volume", "shared_volume"}


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the markers exist whatever
    # config file pytest picked up.
    config.addinivalue_line("markers", "mount: real FUSE mount tests")
    config.addinivalue_line(
        "markers", "allow_log(*regexes): daemon log entries a mount test expects"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MOUNT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mount)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At session end, kill forgotten daemons and lazily unmount every FUSE
    mount under pytest's basetemp (a harness bug if there are any)."""
    yield
    leftovers = cleanup_leftovers(tmp_path_factory.getbasetemp())
    for mountpoint in leftovers:
        print(f"\nconftest: detached a leftover FUSE mount: {mountpoint}", file=sys.stderr)


def _allowed_log_patterns(node: pytest.Item | pytest.Collector) -> list[str]:
    return [p for marker in node.iter_markers("allow_log") for p in marker.args]


@pytest.fixture
def volume(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MountedVolume]:
    """A fresh mounted 6-store volume (k=4, m=2) for one test."""
    if FUSE_MISSING_REASON is not None:
        pytest.skip(FUSE_MISSING_REASON)
    with mounted_volume(tmp_path) as vol:
        yield vol
    vol.check_log_clean(_allowed_log_patterns(request.node))


@pytest.fixture(scope="module")
def shared_volume(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MountedVolume]:
    """A mounted 6-store volume (k=4, m=2) shared by the tests of a module."""
    if FUSE_MISSING_REASON is not None:
        pytest.skip(FUSE_MISSING_REASON)
    with mounted_volume(tmp_path_factory.mktemp("shared")) as vol:
        yield vol
    vol.check_log_clean(_allowed_log_patterns(request.node))


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test S3 credentials (tests/s3servers.py) in this process's
    environment, which the daemon and the CLI inherit; the user's own AWS
    profile settings out of the way."""
    from tests.s3servers import s3_environment

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment({}).items():
        monkeypatch.setenv(name, value)
