#!/usr/bin/env bash
# `taskmesh dev` from a fresh clone: installs a suitable nats-server when none is found,
# builds taskmesh (release) and runs the whole mesh locally — nats-server with JetStream,
# provisioning, the scheduler and every category's worker. Ctrl-C stops everything.
#
#   scripts/dev.sh                  # extra arguments go to `taskmesh dev` (e.g. --port 4333)
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

NATS_SERVER_BIN=$(scripts/ensure-nats-server.sh)
export NATS_SERVER_BIN
cargo build --locked --release --bin taskmesh
exec target/release/taskmesh dev "$@"
