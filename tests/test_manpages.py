"""The man pages in man/: up to date with --help, complete, rendering
without warnings, and found by `man` in the virtual environment.

Regenerate with `python scripts/manpages.py` when a test here says a page is
out of date (the hand-written text is in man/src/).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ecfs.frontend.cli import help_texts
from ecfs.frontend.metrics import METRICS
from tests.mounting import REPO_ROOT, cli


def _load_generator():  # type: ignore[no-untyped-def]
    """scripts/manpages.py (a development script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("ecfs_manpages", REPO_ROOT / "scripts" / "manpages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


manpages = _load_generator()
MAN_DIR = REPO_ROOT / "man"
PAGES = sorted(page.name for page in manpages.PAGES)
COMMANDS = [
    "mkfs", "mount", "umount", "status", "iostat", "scrub", "repair", "fsck", "store", "policy",
    "restripe",
]  # fmt: skip
REQUIRED_SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"]


def page_text(name: str) -> str:
    return (MAN_DIR / f"{name}.8").read_text()


def roff_flag(flag: str) -> str:
    return flag.replace("-", "\\-")


def test_committed_pages_are_up_to_date() -> None:
    stale = manpages.stale_pages(MAN_DIR, manpages.render_pages(help_texts()))
    assert not stale, f"out of date: {stale}; run: python scripts/manpages.py"


def test_check_mode_reports_a_stale_page(tmp_path: Path) -> None:
    pages = manpages.render_pages(help_texts())
    for name, text in pages.items():
        (tmp_path / name).write_text(text)
    assert manpages.stale_pages(tmp_path, pages) == []
    (tmp_path / "ecfs-mount.8").write_text(pages["ecfs-mount.8"].replace("allow_other", "x"))
    (tmp_path / "ecfs-gone.8").write_text("")
    assert manpages.stale_pages(tmp_path, pages) == ["ecfs-mount.8", "ecfs-gone.8"]


def test_every_command_has_a_page() -> None:
    listed = re.findall(r"^  (\w+)\s", cli("--help").stdout.split("Commands:")[1], re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS)
    assert set(PAGES) == {"ecfs", *(f"ecfs-{c}" for c in COMMANDS)}
    assert sorted(p.name for p in MAN_DIR.glob("*.8")) == sorted(f"{p}.8" for p in PAGES)


@pytest.mark.parametrize(
    "command",
    [
        [], *([c] for c in COMMANDS), ["store", "replace"], ["store", "add"], ["store", "remove"],
        ["policy", "set"], ["policy", "get"], ["policy", "clear"],
    ],  # fmt: skip
    ids=lambda c: " ".join(c) or "ecfs",
)
def test_every_option_of_help_is_in_the_page(command: list[str]) -> None:
    """Read from `--help` as a user sees it, independently of the generator."""
    text = page_text("ecfs-" + command[0] if command else "ecfs")
    help_text = cli(*command, "--help").stdout
    usage = help_text.splitlines()[0].removeprefix("Usage: ")
    for word in usage.split()[len(command) + 1 :]:
        assert re.sub(r"[A-Z][A-Z_]+", lambda m: f"\\fI{m[0]}\\fR", word) in text, word
    options = help_text.split("Options:")[1].split("Commands:")[0]
    flags = re.findall(r"^  (-\w|--[\w-]+)(?:, (--[\w-]+))?", options, re.MULTILINE)
    assert flags
    for short, long in flags:
        for flag in filter(None, (short, long)):
            assert f"\\fB{roff_flag(flag)}\\fR" in text, f"{flag} missing from the page"


@pytest.mark.parametrize("name", PAGES)
def test_page_has_the_usual_sections(name: str) -> None:
    sections = re.findall(r"^\.SH (.+)$", page_text(name), re.MULTILINE)
    for required in REQUIRED_SECTIONS:
        if required == "OPTIONS" and name == "ecfs-store":
            continue  # options are listed per subcommand
        assert required in sections, f"{name}: no {required} section"
    assert re.search(
        rf"^{re.escape(name.replace('-', chr(92) + '-'))} \\- \w", page_text(name), re.M
    )


def test_hand_written_sections() -> None:
    for name in ("ecfs-mount", "ecfs-mkfs", "ecfs-status", "ecfs-fsck"):
        sections = re.findall(r"^\.SH (.+)$", page_text(name), re.MULTILINE)
        assert "EXAMPLES" in sections and ("FILES" in sections), name
    mount = page_text("ecfs-mount")
    for option in (
        "allow_other",
        "repair_rate=",
        "rebuild_after=",
        "_netdev",
        "nofail",
        "fuse.ecfs",
    ):
        assert option in mount.replace("\\-", "-"), option
    for name in ("ecfs-status", "ecfs-scrub", "ecfs-fsck"):
        assert ".SH JSON OUTPUT" in page_text(name), name


def test_every_metric_is_documented() -> None:
    text = page_text("ecfs-status")
    for metric in METRICS:
        assert f"\\fB{metric.name}\\fR" in text, metric.name


def test_the_generator_rewrites_and_checks(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "manpages.py"), "--check"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_runtime_package_holds_no_man_page_text() -> None:
    assert not (REPO_ROOT / "ecfs" / "manpages.py").exists()
    sources = sorted(p.stem for p in (MAN_DIR / "src").glob("*.txt") if not p.stem.startswith("_"))
    assert sources == PAGES


def test_a_source_file_makes_a_page(tmp_path: Path) -> None:
    """The source format: header lines, == sections, {{shared}} text."""
    (tmp_path / "_shared.txt").write_text("Shared *TEXT*.\n")
    (tmp_path / "ecfs-status.txt").write_text(
        "commands: ecfs status\nsummary: show it\n\n== DESCRIPTION\nMore.\n\n"
        "== EXAMPLES\n    ecfs status /mnt\n\n{{shared}} And more.\n"
    )
    (page,) = manpages.load_pages(tmp_path)
    assert (page.name, page.commands, page.summary) == ("ecfs-status", ("ecfs status",), "show it")
    assert page.description == "More."
    assert page.sections == {"EXAMPLES": "    ecfs status /mnt\n\nShared *TEXT*. And more."}
    text = manpages.render_page(page, help_texts())
    assert "\\fITEXT\\fR. And more." in text and ".SH EXAMPLES" in text


def test_markup_escapes_roff() -> None:
    lines = manpages._blocks(".starts with a dot and has a \\ backslash and --json")
    assert lines[1].startswith("\\&.") and "\\e" in lines[1] and "\\-\\-json" in lines[1]
    example = manpages._blocks("    ecfs mount -o ro '/srv/d*' /mnt")
    assert example[3] == "ecfs mount \\-o ro '/srv/d*' /mnt"


# --- rendering ---------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("groff") is None, reason="groff missing (scripts/install.sh installs groff-base)"
)
@pytest.mark.parametrize("name", PAGES)
def test_groff_renders_without_warnings(name: str) -> None:
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN_DIR / f"{name}.8")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.skipif(
    shutil.which("man") is None, reason="man missing (scripts/install.sh installs man-db)"
)
@pytest.mark.parametrize("name", PAGES)
def test_man_renders_without_warnings(name: str) -> None:
    result = subprocess.run(
        ["man", "--warnings", "-l", str(MAN_DIR / f"{name}.8")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    text = re.sub(".\b", "", result.stdout)  # overstrike bold and underline
    assert "EXIT STATUS" in text
    assert max(len(line) for line in text.splitlines()) <= 80 or name in (
        "ecfs-mount", "ecfs-status", "ecfs-scrub",  # verbatim examples may be wider
    )  # fmt: skip


@pytest.mark.skipif(
    shutil.which("man") is None, reason="man missing (scripts/install.sh installs man-db)"
)
def test_man_finds_the_pages_installed_in_the_venv() -> None:
    installed = Path(sys.prefix) / "share" / "man" / "man8" / "ecfs.8"
    if sys.prefix == sys.base_prefix or not installed.exists():
        pytest.skip(f"no {installed}: ecfs is not installed in a venv by scripts/install.sh")
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}:/usr/bin:/bin", "MANPATH": ""}
    del env["MANPATH"]
    for name in ("ecfs", "ecfs-mount"):
        result = subprocess.run(
            ["man", "-w", name], capture_output=True, text=True, timeout=60, env=env
        )
        assert result.returncode == 0, result.stderr
        assert Path(result.stdout.strip()).read_text() == page_text(name)
