#!/usr/bin/env bash
# The full fault tier (docs/fault-suite.md): cluster leader loss, step-downs, a frozen
# leader, a whole-cluster bounce, a frozen worker, network faults through a TCP proxy and
# hostile input — plus the PR tier. Writes target/fault-report.md.
#
#   scripts/fault-suite.sh              # everything (about 2.5 minutes on 2 cores; budget 40)
#   scripts/fault-suite.sh leader       # only tests whose name contains "leader"
set -uo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

NATS_SERVER_BIN=$(scripts/ensure-nats-server.sh)
export NATS_SERVER_BIN
export TASKMESH_FAULT_FULL=1
REPORT=target/fault-report.md
LOG=target/fault-suite.log
mkdir -p target

cargo build --locked --bin taskmesh || exit 1
start=$(date +%s)
# Two at a time: the cluster scenarios are heavy on a 2-core machine.
cargo test --locked -p taskmesh-tests --test fault_pr --test fault_full -- \
    --test-threads=2 --nocapture "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
end=$(date +%s)

{
    echo "# taskmesh fault suite report"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- nats-server: $("$NATS_SERVER_BIN" --version 2>&1)"
    echo "- wall time: $((end - start)) s, exit code $rc"
    echo
    echo "## Results"
    echo
    echo '```'
    grep -E '^test .* \.\.\. ' "$LOG" || true
    grep -E '^test result:' "$LOG" || true
    echo '```'
    echo
    echo "## Checker reports"
    echo
    echo '```'
    grep -E -A8 '^\[fault\]' "$LOG" | grep -vE '^(--|test )' || true
    echo '```'
    echo
    echo "## Failures"
    echo
    echo '```'
    grep -E -A12 "panicked at" "$LOG" | head -200 || true
    echo '```'
} >"$REPORT"
echo "fault-suite.sh: report in $REPORT (log $LOG)" >&2
exit "$rc"
