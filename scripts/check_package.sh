#!/usr/bin/env bash
# ecfs as a package: build the wheel, install it into a fresh virtual
# environment, and use it the way a user would. Catches what an editable
# install hides: package data left out of the wheel (man pages, the example
# event hook, the Grafana dashboard), an entry point that does not start,
# a dependency missing from pyproject.toml.
#
#   bash scripts/check_package.sh          (scripts/check.sh runs it)
#
# Steps, in a temporary directory that is removed at the end:
#  1. the wheel, built with `pip wheel --no-deps` from a copy of the
#     source files git knows (a stale build/ directory never leaks in);
#  2. its contents: man pages, the hook (executable), the dashboard;
#  3. a fresh venv with `pip install ecfs-*.whl` (dependencies from the
#     configured index: pyfuse3 there is PyPI's, without the fallocate
#     handler; ecfs mounts anyway and says so in its log): `ecfs --version`,
#     `man -w` with the venv's share/man in MANPATH, shell completion,
#     the package data through importlib.resources;
#  4. a demo volume: mkfs over three temp dirs, mount (as a daemon), write
#     and read back a file, umount; a trap unmounts whatever happens;
#  5. `pipx install` of the source tree, when pipx is there (the test
#     extra installs it): `ecfs --version` and the man pages it exposes.
# Needs no stdin; about 30 s with warm pip caches.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
build_python=${ECFS_BUILD_PYTHON:-$repo/.venv/bin/python}
[[ -x $build_python ]] || build_python=python3
venv_python=${PYTHON:-python3}

say() { printf '[package] %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ecfs-package.XXXXXX")
mnt=$work/mnt
ecfs_bin=$work/venv/bin/ecfs
cleanup() {
    if grep -qF " $mnt " /proc/self/mountinfo 2>/dev/null; then
        say "unmounting the demo volume"
        timeout 60 "$ecfs_bin" umount "$mnt" >/dev/null 2>&1 \
            || fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# --- 1. the wheel -------------------------------------------------------------
src=$work/src
mkdir -p "$src"
if command -v git >/dev/null 2>&1 && git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | (cd "$repo" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _) \
        | tar -C "$repo" --null -T - -cf - | tar -C "$src" -xf -
else
    tar -C "$repo" --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
        -cf - . | tar -C "$src" -xf -
fi
say "building the wheel"
"$build_python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" "$src"
wheel=$(ls "$work"/dist/ecfs-*.whl)
say "built $(basename "$wheel")"

# --- 2. what the wheel carries ------------------------------------------------
"$build_python" - "$wheel" "$src" <<'EOF'
import pathlib, stat, sys, zipfile
wheel, src = sys.argv[1], pathlib.Path(sys.argv[2])
names = {i.filename: i for i in zipfile.ZipFile(wheel).infolist()}
pages = sorted(p.name for p in (src / "man").glob("*.8"))
missing = [p for p in pages if not any(n.endswith("/data/share/man/man8/" + p) for n in names)]
wanted = ["ecfs/share/hooks/mail-on-event"]
wanted += [str(p.relative_to(src)) for p in sorted((src / "ecfs/share/grafana").glob("*.json"))]
missing += [w for w in wanted if w not in names]
if missing:
    sys.exit(f"the wheel lacks {missing}")
mode = names["ecfs/share/hooks/mail-on-event"].external_attr >> 16
if not mode & stat.S_IXUSR:
    sys.exit("the example hook is not executable in the wheel")
print(f"[package] the wheel has {len(pages)} man pages and {len(wanted)} data files")
EOF

# --- 3. a fresh venv ------------------------------------------------------------
cd "$work"  # never import the source tree by accident (python - puts . first)
say "installing the wheel into a fresh venv"
"$venv_python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
version=$("$ecfs_bin" --version)
expected=$("$build_python" -c 'import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
print(next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"))' \
    "$src/ecfs/__init__.py")
[[ $version == "ecfs, version $expected" ]] || fail "ecfs --version said '$version', want $expected"
say "$version"
if command -v man >/dev/null 2>&1; then
    for page in ecfs ecfs-mount; do
        found=$(MANPATH=$work/venv/share/man man -w "$page") || fail "man -w $page found nothing"
        [[ $found == "$work/venv/"* ]] || fail "man -w $page found $found, not the venv's page"
    done
    say "man pages found: MANPATH=\$VENV/share/man man ecfs"
else
    [[ -f $work/venv/share/man/man8/ecfs.8 ]] || fail "no ecfs.8 in the venv"
fi
_ECFS_COMPLETE=bash_source "$ecfs_bin" | grep -q "_ecfs_completion" \
    || fail "bash completion script missing"
"$work/venv/bin/python" - <<'EOF'
import importlib.resources, json, os, sys
share = importlib.resources.files("ecfs") / "share"
if "/venv/" not in str(share):
    sys.exit(f"imported ecfs from {share}, not from the fresh venv")
hook = share / "hooks" / "mail-on-event"
if not hook.is_file() or not os.access(str(hook), os.X_OK):
    sys.exit(f"the installed example hook {hook} is missing or not executable")
for dashboard in (share / "grafana").iterdir() if (share / "grafana").is_dir() else ():
    json.loads(dashboard.read_text())
print(f"[package] package data installed in {share}")
EOF

# --- 4. a demo volume ---------------------------------------------------------
if [[ -e /dev/fuse ]] && command -v fusermount3 >/dev/null 2>&1; then
    say "demo: mkfs, mount, write, read, umount with the installed ecfs"
    mkdir -p "$mnt"
    # The three stores share this machine's one disk: each is named its own
    # failure domain, as if on its own disk (ecfs-mkfs(8), --domain), so that
    # the volume is healthy and `ecfs status` exits 0.
    "$ecfs_bin" mkfs -k 2 -m 1 --domain "$work/s0=d0" --domain "$work/s1=d1" \
        --domain "$work/s2=d2" "$work/s0" "$work/s1" "$work/s2" >/dev/null
    "$ecfs_bin" mount --log-file "$work/mount.log" "$work/s0" "$work/s1" "$work/s2" "$mnt"
    head -c 3000000 /dev/urandom >"$work/data"
    cp "$work/data" "$mnt/data"
    cmp "$work/data" "$mnt/data" || fail "the file read back differs"
    "$ecfs_bin" status "$mnt" >/dev/null || fail "ecfs status says the demo volume is unhealthy"
    "$ecfs_bin" umount "$mnt"
    grep -q "lacks ecfs's patches" "$work/mount.log" \
        && say "note: this pyfuse3 lacks ecfs's patches (see scripts/pyfuse3/README.md)"
    say "demo volume mounted, used and unmounted"
else
    say "no /dev/fuse or fusermount3: demo mount skipped"
fi

# --- 5. pipx --------------------------------------------------------------------
pipx=$(dirname "$build_python")/pipx
[[ -x $pipx ]] || pipx=$(command -v pipx || true)
if [[ -n $pipx ]]; then
    say "pipx install of the source tree"
    # The layout of pipx's defaults (~/.local/bin, ~/.local/share/man) under $work.
    export PIPX_HOME=$work/pipx PIPX_BIN_DIR=$work/local/bin PIPX_MAN_DIR=$work/local/share/man
    "$pipx" install --quiet "$src" >/dev/null 2>&1 || "$pipx" install "$src"
    [[ $("$PIPX_BIN_DIR/ecfs" --version) == "$version" ]] || fail "pipx's ecfs --version differs"
    if [[ -d $PIPX_MAN_DIR/man8 ]]; then
        [[ -e $PIPX_MAN_DIR/man8/ecfs-mount.8 ]] || fail "pipx exposed no ecfs-mount.8"
        if command -v man >/dev/null 2>&1; then
            # man finds them through PATH alone (BIN/../share/man), as after `pipx ensurepath`.
            found=$(env -u MANPATH PATH="$PIPX_BIN_DIR:/usr/bin:/bin" man -w ecfs-mount) \
                || fail "man -w ecfs-mount found nothing with pipx's bin directory in PATH"
            [[ $found == "$work/"* ]] || fail "man -w ecfs-mount found $found, not pipx's"
        fi
        say "pipx: ecfs and its man pages ($PIPX_MAN_DIR, found by man through PATH) installed"
    else
        say "pipx: ecfs installed (this pipx exposes no man pages: use MANPATH=\$(pipx environment --value PIPX_LOCAL_VENVS)/ecfs/share/man)"
    fi
else
    say "pipx not found: pipx step skipped"
fi
say "done"
