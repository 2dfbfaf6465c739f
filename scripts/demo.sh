#!/usr/bin/env bash
# Demo: an ecfs volume over 6 stores (4 data + 2 parity), filled with real
# files, checked, then read back with one store gone.
#
#   bash scripts/demo.sh
#
# Environment: ECFS_DEMO_DIR=DIR to work in DIR (default: a new temp dir),
# ECFS_DEMO_KEEP=1 to keep the state dir afterwards (unmounted).
# Everything is unmounted and removed on any exit, failure or Ctrl-C.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

step_no=0
step() { step_no=$((step_no + 1)); printf '\n==> [%d] %s\n' "$step_no" "$*"; }
run() { printf '    $'; printf ' %q' "$@"; printf '\n'; "$@"; }

step "Install system packages and the Python environment (scripts/install.sh)"
bash scripts/install.sh

ecfs=$repo/.venv/bin/ecfs
python=$repo/.venv/bin/python

if [[ -n ${ECFS_DEMO_DIR:-} ]]; then
    state=$ECFS_DEMO_DIR
    [[ ! -e $state || -z $(ls -A "$state") ]] || {
        echo "ECFS_DEMO_DIR=$state is not empty" >&2
        exit 2
    }
    mkdir -p "$state"
else
    state=$(mktemp -d "${TMPDIR:-/tmp}/ecfs-demo.XXXXXX")
fi
state=$(cd "$state" && pwd)
stores=("$state"/stores/s{0..5})
mnt=$state/mnt
log=$state/ecfs.log
offline=$state/offline-s3

is_mounted() { awk -v mp="$1" '$5 == mp { found = 1 } END { exit !found }' /proc/self/mountinfo; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if is_mounted "$mnt"; then
        echo "    (cleanup) unmounting $mnt"
        timeout 60 "$ecfs" umount "$mnt" || fusermount3 -uz "$mnt"
        is_mounted "$mnt" && fusermount3 -uz "$mnt"
    fi
    if [[ $rc -ne 0 ]]; then
        echo
        echo "FAILED (exit $rc) at step $step_no."
        [[ -s $log ]] && { echo "--- last lines of $log ---"; tail -n 40 "$log"; }
    fi
    if [[ ${ECFS_DEMO_KEEP:-0} == 1 ]]; then
        echo "State kept in $state"
    elif ! is_mounted "$mnt"; then
        rm -rf --one-file-system "$state"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "Make a state dir with a mountpoint ($state); the 6 stores are created by mkfs"
mkdir -p "$mnt" "$state/stores"

step "Prepare source files: the Python standard library, this repository, 64 MiB of random bytes"
src=$state/src
mkdir -p "$src/stdlib" "$src/ecfs-repo"
stdlib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
tar -C "$stdlib" --exclude=site-packages --exclude=test --exclude=__pycache__ \
    --exclude='config-*' --exclude=lib-dynload -cf - . | tar -C "$src/stdlib" -xf -
tar -C "$repo" --exclude=.venv --exclude=.git --exclude=__pycache__ \
    --exclude='*_cache' -cf - . | tar -C "$src/ecfs-repo" -xf -
head -c $((64 << 20)) /dev/urandom >"$src/random-64MiB.bin"
(cd "$src" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$state/SHA256SUMS"
echo "    $(wc -l <"$state/SHA256SUMS") files, $(du -sh "$src" | cut -f1)"

step "Create the volume: 4 data + 2 parity fragments per chunk, over 6 stores"
run "$ecfs" mkfs --data 4 --parity 2 --allow-shared-domains "${stores[@]}"

step "Mount it (the daemon detaches once the mount is ready; log in $log)"
run "$ecfs" mount --log-file "$log" "${stores[@]}" "$mnt"

step "Copy the files in"
time cp -R --preserve=mode,timestamps "$src/." "$mnt/"

step "Verify every file through the mount against the source's SHA-256"
(cd "$mnt" && run sha256sum --quiet -c "$state/SHA256SUMS")
echo "    all files match"

step "Look at it"
run ls -la "$mnt"
run df -h "$mnt"
echo "    What each store holds (source: $(du -sh "$src" | cut -f1); 4+2 coding stores 1.5x):"
du -sh "${stores[@]}" | sed 's/^/    /'

step "Unmount"
run "$ecfs" umount "$mnt"

step "Make store s3 unavailable (move it away), as if its disk had died"
run mv "$state/stores/s3" "$offline"

step "Mount the 5 remaining stores (a glob pattern) and verify every file again (degraded reads)"
run "$ecfs" mount --log-file "$log" "$state/stores/s*" "$mnt"
(cd "$mnt" && run sha256sum --quiet -c "$state/SHA256SUMS")
echo "    all files match"

step "Unmount and put store s3 back"
run "$ecfs" umount "$mnt"
run mv "$offline" "$state/stores/s3"

step "Check the daemon's log: two clean unmounts, no errors (warnings about s3 are expected)"
warnings=$(grep -cE ' WARNING ' "$log" || true)
echo "    $warnings warnings, the first ones:"
grep -E ' WARNING ' "$log" | head -n 3 | cut -c1-150 | sed 's/^/    /' || true
if grep -nE ' ERROR | CRITICAL |Traceback' "$log"; then
    echo "    the log shows errors" >&2
    exit 1
fi
[[ $(grep -c 'unmounted .* cleanly' "$log") -eq 2 ]] || {
    echo "    expected two clean unmounts in $log" >&2
    exit 1
}
echo "    no errors"

printf '\nSUCCESS: %s files (%s) written over 6 stores and read back intact, also with one store gone.\n' \
    "$(wc -l <"$state/SHA256SUMS")" "$(du -sh "$src" | cut -f1)"
