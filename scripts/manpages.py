"""The man pages in man/: roff generated from the commands' --help plus the
hand-written text in man/src/.

    python scripts/manpages.py            # rewrite man/*.8 from the CLI
    python scripts/manpages.py --check    # exit 1 if a committed page is stale

Sources: man/src/PAGE.txt is the page PAGE.8. It starts with two lines,
`commands: ecfs store | ecfs store add | ...` (whose --help the page
shows; the first names it) and `summary: ...` (the NAME line), then
sections, each starting with a line `== TITLE`, placed after OPTIONS in
their order (`== DESCRIPTION` goes under the --help text instead; a section
whose text is `@METRICS@` lists ecfs.frontend.metrics.METRICS). `{{name}}` stands
for the text of man/src/_name.txt, shared by several pages.

Owns: reading the sources and rendering them to roff
(man(7) macros only: .TH .SH .SS .PP .TP .IP .RS/.RE .nf/.fi, so that
groff, mandoc and man-db all render it). Must not: import click. What the
commands' --help says comes in as plain data from `ecfs.frontend.cli.help_texts()`
(see there for its shape); `render_pages` is pure, only `main` writes files.
A development tool: the runtime package never imports it.

Hand-written text uses a small markup, rendered by `_blocks`: paragraphs
separated by blank lines; `code` is bold, *WORD* italic; a block indented
by four spaces is shown verbatim (examples); a block whose first line ends
with "::" is a tagged paragraph (the term, then its explanation); lines
starting with "- " are bullet items.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from ecfs import __version__  # noqa: E402
from ecfs.frontend.metrics import METRICS  # noqa: E402

MAN_DIR = REPO_ROOT / "man"
SOURCE_DIR = MAN_DIR / "src"
SECTION = "8"


@dataclass(frozen=True)
class Page:
    """One man page: `commands` whose --help it shows (the first one names
    the page), a one-line `summary` for NAME, and hand-written `sections`
    (title -> markup) placed after OPTIONS, in order."""

    name: str
    commands: tuple[str, ...]
    summary: str
    description: str = ""
    sections: dict[str, str] = field(default_factory=dict)


_SEE_ALSO_ALL = (
    "ecfs", "ecfs-mkfs", "ecfs-mount", "ecfs-umount", "ecfs-status", "ecfs-iostat",
    "ecfs-scrub", "ecfs-repair", "ecfs-fsck", "ecfs-store", "ecfs-policy", "ecfs-restripe",
)  # fmt: skip


# --------------------------------------------------------------------------
# Sources


def load_page(path: Path) -> Page:
    """One page from its source file (see the module docstring)."""
    header, _, body = path.read_text().partition("\n== ")
    fields = dict(line.split(": ", 1) for line in header.strip().splitlines())
    sections: dict[str, str] = {}
    for part in ("== " + body).split("\n== ") if body else []:
        title, _, text = part.removeprefix("== ").partition("\n")
        sections[title.strip()] = _expand(text.strip("\n"), path.parent)
    return Page(
        name=path.stem,
        commands=tuple(c.strip() for c in fields["commands"].split("|")),
        summary=fields["summary"],
        description=sections.pop("DESCRIPTION", ""),
        sections=sections,
    )


def _expand(text: str, directory: Path) -> str:
    """Replace each {{name}} by the shared text in `_name.txt`."""
    return re.sub(
        r"\{\{([\w-]+)\}\}", lambda m: (directory / f"_{m[1]}.txt").read_text().rstrip("\n"), text
    )


def load_pages(directory: Path = SOURCE_DIR) -> tuple[Page, ...]:
    """Every page with a source file in `directory`, by name."""
    return tuple(load_page(p) for p in sorted(directory.glob("*.txt")) if not p.name.startswith("_"))


PAGES: tuple[Page, ...] = load_pages()


# --------------------------------------------------------------------------
# Rendering


def render_pages(help_texts: dict[str, dict[str, Any]]) -> dict[str, str]:
    """File name ("ecfs-mount.8") -> roff text, for every page in PAGES."""
    return {f"{page.name}.{SECTION}": render_page(page, help_texts) for page in PAGES}


def render_page(page: Page, help_texts: dict[str, dict[str, Any]]) -> str:
    main = help_texts[page.commands[0]]
    out = [
        f'.TH "{page.name.upper()}" "{SECTION}" "" "ecfs {__version__}" "ecfs manual"',
        ".nh",  # no hyphenation: option names must stay whole
        ".ad l",
        ".SH NAME",
        f"{_escape(page.name, hyphens=True)} \\- {_escape(page.summary)}",
        ".SH SYNOPSIS",
    ]
    for i, command in enumerate(page.commands):
        if i:
            out.append(".br")
        out.extend(_synopsis(help_texts[command]["usage"]))
    out.append(".SH DESCRIPTION")
    out.extend(_click_help(main["help"]))
    if page.description:
        out.extend(_blocks(page.description))
    if main["commands"]:
        out.append(".SH COMMANDS")
        for name, short in main["commands"]:
            full = f"{page.commands[0]} {name}"
            own_page = _page_of(full)
            ref = f" See {own_page}({SECTION})." if own_page and own_page != page.name else ""
            out.append(".TP")
            out.append(f"\\fB{_escape(full)}\\fR")
            out.append(_inline(short) + _inline(ref))
    if main["options"]:
        out.append(".SH OPTIONS")
        out.extend(_options(main["options"]))
    for command in page.commands[1:]:
        sub = help_texts[command]
        out.append(f'.SS "{_escape(command)}"')
        out.extend(_click_help(sub["help"]))
        options = [o for o in sub["options"] if not o[0].startswith("-h, --help")]
        if options:
            out.append(".PP")
            out.append("Options:")
            out.extend(_options(options))
    for title, text in page.sections.items():
        out.append(f".SH {title}")
        if text == "@METRICS@":
            out.extend(_metrics_section())
        elif title == "SEE ALSO":
            out.append(_see_also(page, text))
        else:
            out.extend(_blocks(text))
    if "SEE ALSO" not in page.sections:
        out.append(".SH SEE ALSO")
        out.append(_see_also(page, ""))
    return "\n".join(out) + "\n"


def _page_of(command: str) -> str | None:
    for page in PAGES:
        if command in page.commands:
            return page.name
    return None


def _see_also(page: Page, extra: str) -> str:
    refs = [f"\\fB{_escape(name)}\\fR({SECTION})" for name in _SEE_ALSO_ALL if name != page.name]
    if extra:
        refs.extend(
            re.sub(r"^([\w.-]+)\((\d)\)$", lambda m: f"\\fB{_escape(m[1])}\\fR({m[2]})", ref)
            for ref in (r.strip() for r in extra.split(","))
        )
    return ", ".join(refs)


def _synopsis(usage: str) -> list[str]:
    """ "ecfs mount [OPTIONS] STORES... MOUNTPOINT" -> bold command words,
    italic metavariables."""
    words = usage.split()
    command = [w for w in words if re.fullmatch(r"[a-z][a-z0-9-]*", w)]
    rest = words[len(command) :]
    line = " ".join(re.sub(r"([A-Z][A-Z_]+)", r"\\fI\1\\fR", _escape(w)) for w in rest)
    return [f".B {_escape(' '.join(command))}", line] if line else [f".B {' '.join(command)}"]


def _options(records: Iterable[Sequence[str]]) -> list[str]:
    out = []
    for terms, help_text in records:
        out.append(".TP")
        out.append(_option_term(terms))
        out.append(_inline(help_text) if help_text else "")
        if not help_text:
            out.pop()
    return out


def _option_term(terms: str) -> str:
    """ "-k, --data INTEGER" -> bold flags, italic metavariable."""
    parts = []
    for part in terms.split(", "):
        flag, _, metavar = part.partition(" ")
        text = f"\\fB{_escape(flag, hyphens=True)}\\fR"
        if metavar:
            text += f" \\fI{_escape(metavar, hyphens=True)}\\fR"
        parts.append(text)
    return ", ".join(parts)


def _click_help(text: str) -> list[str]:
    """A docstring as click shows it: paragraphs filled, except a paragraph
    that starts with a line "\\b", whose lines are kept."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines = paragraph.splitlines()
        if lines and lines[0].strip() == "\b":
            out.append(".PP")
            out.append(".nf")
            out.extend(_escape_line(_inline_code(line)) for line in lines[1:])
            out.append(".fi")
        elif paragraph.strip():
            out.append(".PP")
            out.append(_inline(" ".join(line.strip() for line in lines)))
    return out


def _blocks(text: str) -> list[str]:
    """Render the hand-written markup (see the module docstring)."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = block.splitlines()
        if all(line.startswith("    ") for line in lines):
            out += [".PP", ".RS 4", ".nf"]
            out += [_escape_line(_escape(line[4:], hyphens=True)) for line in lines]
            out += [".fi", ".RE"]
        elif lines[0].endswith("::"):
            out.append(".TP")
            out.append(_inline(lines[0][:-2]))
            out.append(_inline(" ".join(lines[1:])))
        elif lines[0].startswith("- "):
            items: list[list[str]] = []
            for line in lines:
                if line.startswith("- "):
                    items.append([line[2:]])
                else:
                    items[-1].append(line.strip())
            for item in items:
                out += [".IP \\(bu 2", _inline(" ".join(item))]
        else:
            out.append(".PP")
            out.append(_inline(" ".join(line.strip() for line in lines)))
    return out


def _metrics_section() -> list[str]:
    out = _blocks("""\
`--prometheus` prints the status as Prometheus text (exposition
format 0.0.4). Labels: `store` is the store index, `reason` a repair
reason (see JSON OUTPUT). The metrics:""")
    for metric in METRICS:
        labels = "{" + ",".join(metric.labels) + "}" if metric.labels else ""
        out.append(".TP")
        out.append(f"\\fB{_escape(metric.name)}\\fR{_escape(labels)} ({metric.type})")
        out.append(_inline(metric.help))
    return out


def _escape(text: str, hyphens: bool = False) -> str:
    """Text -> roff: backslashes doubled; with `hyphens`, every '-' becomes
    '\\-' (a real minus, so that options can be copied), otherwise only a
    '-' that starts a word."""
    text = text.replace("\\", "\\e")
    if hyphens:
        return text.replace("-", "\\-")
    return re.sub(r"(?<![\w-])-+", lambda m: m[0].replace("-", "\\-"), text)


def _inline_code(text: str) -> str:
    return _escape(text, hyphens=True)


def _inline(text: str) -> str:
    """Markup -> roff on one line: `code` bold, *WORD* italic."""
    pieces = re.split(r"(`[^`]+`|\*[^*\s][^*]*\*)", text)
    out = []
    for piece in pieces:
        if piece.startswith("`") and piece.endswith("`") and len(piece) > 1:
            out.append(f"\\fB{_escape(piece[1:-1], hyphens=True)}\\fR")
        elif piece.startswith("*") and piece.endswith("*") and len(piece) > 2:
            out.append(f"\\fI{_escape(piece[1:-1], hyphens=True)}\\fR")
        else:
            out.append(_escape(piece))
    return _escape_line("".join(out))


def _escape_line(line: str) -> str:
    """A text line must not start with a control character (. or ')."""
    return "\\&" + line if line.startswith((".", "'")) else line


# --------------------------------------------------------------------------
# Files


def stale_pages(directory: Path, pages: dict[str, str]) -> list[str]:
    """Names of pages whose file in `directory` is missing or differs, and
    of *.8 files there that no page generates."""
    stale = [
        name
        for name, text in pages.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
    stale += sorted(p.name for p in directory.glob(f"*.{SECTION}") if p.name not in pages)
    return stale


def main(argv: Sequence[str] = ()) -> int:
    """Write the pages into man/ (or with --check, report stale ones)."""
    from ecfs.frontend.cli import help_texts  # cli owns click; the rendering never imports it

    pages = render_pages(help_texts())
    if "--check" in argv:
        stale = stale_pages(MAN_DIR, pages)
        for name in stale:
            print(f"man/{name} is out of date: run python scripts/manpages.py", file=sys.stderr)
        return 1 if stale else 0
    MAN_DIR.mkdir(exist_ok=True)
    for name, text in pages.items():
        path = MAN_DIR / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote man/{name}")
    for name in stale_pages(MAN_DIR, pages):
        if name not in pages:
            (MAN_DIR / name).unlink()
            print(f"removed man/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
