#!/usr/bin/env bash
# Peer benchmarks: no-op drain and idle start latency on taskmesh, Celery (Redis broker,
# prefork and threads pools) and BullMQ (Redis, concurrency 50), back to back on this
# machine, then the ratios. One command; installs what it needs:
#   - Celery (pinned) into bench/peers/.venv, BullMQ (pinned) into bench/peers/node_modules
#   - redis-server from Debian (apt-get) when none is on PATH, started on a free loopback
#     port under a temp dir and stopped at the end
#   - taskmesh: target/release/taskmesh (built when missing; TASKMESH_BIN overrides)
# Knobs (env): TM_N (100000), CELERY_N (5000), BULLMQ_N (50000), LAT_N (300), LAT_RATE (50).
# Output: one JSON line per measurement in $OUT (default $TMPDIR/taskmesh-peers-results.jsonl),
# then a table.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
CELERY_PIN='celery[redis]==5.7.0'
TM_N="${TM_N:-100000}"
CELERY_N="${CELERY_N:-5000}"
BULLMQ_N="${BULLMQ_N:-50000}"
LAT_N="${LAT_N:-300}"
LAT_RATE="${LAT_RATE:-50}"
OUT="${OUT:-${TMPDIR:-/tmp}/taskmesh-peers-results.jsonl}"

log() { printf '== %s\n' "$*" >&2; }

# --- installs -----------------------------------------------------------------------------
if ! command -v redis-server >/dev/null; then
  log "installing redis-server (apt)"
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
if [ ! -x "$here/.venv/bin/celery" ]; then
  log "installing $CELERY_PIN into bench/peers/.venv"
  python3 -m venv "$here/.venv"
  "$here/.venv/bin/pip" install -q "$CELERY_PIN"
fi
if [ ! -d "$here/node_modules/bullmq" ] || [ ! -d "$here/node_modules/ioredis" ]; then
  log "installing bullmq + ioredis (package.json pins) into bench/peers/node_modules"
  (cd "$here" && npm install --no-package-lock --no-audit --no-fund --silent)
fi
TASKMESH_BIN="${TASKMESH_BIN:-$root/target/release/taskmesh}"
if [ ! -x "$TASKMESH_BIN" ]; then
  log "building taskmesh (release)"
  (cd "$root" && cargo build --release -p taskmesh)
fi
if [ -z "${NATS_SERVER_BIN:-}" ]; then
  NATS_SERVER_BIN="$("$root/scripts/ensure-nats-server.sh")"
  export NATS_SERVER_BIN
fi

# --- redis on a free loopback port --------------------------------------------------------
tmp="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --bind 127.0.0.1 --port "$port" --dir "$tmp" --save '' --appendonly no \
  --daemonize no --logfile "$tmp/redis.log" &
redis_pid=$!
cleanup() { kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
for _ in $(seq 100); do
  "$here/.venv/bin/python" -c "import redis,sys; redis.Redis(port=$port).ping()" 2>/dev/null && break
  sleep 0.1
done
export BENCH_REDIS_URL="redis://127.0.0.1:$port/0"

: >"$OUT"
record() { tee -a "$OUT"; }
log "load: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; $(redis-server --version | cut -d' ' -f1-3); celery $("$here/.venv/bin/celery" --version | cut -d' ' -f1); bullmq $(node -p "require('$here/node_modules/bullmq/package.json').version"); node $(node --version)"

# --- taskmesh ------------------------------------------------------------------------------
log "taskmesh drain (e2e --prefill, n=$TM_N)"
{ "$TASKMESH_BIN" bench e2e --prefill --n "$TM_N" --json 2>"$tmp/taskmesh.log" || { cat "$tmp/taskmesh.log" >&2; exit 1; }; } | python3 -c '
import json,sys; d=json.load(sys.stdin)
print(json.dumps({"system":"taskmesh","workload":"drain","n":d["n"],"concurrency":d["concurrency"],
 "tasks_per_sec":d["results_off"]["tasks_per_sec"],"results_on_tasks_per_sec":d["results_on"]["tasks_per_sec"],
 "raw_msgs_per_sec":d["raw_msgs_per_sec"],"loadavg":d["loadavg"]}))' | record
log "taskmesh idle latency (rate $LAT_RATE/s, n=$LAT_N)"
{ "$TASKMESH_BIN" bench latency --rate "$LAT_RATE" --n "$LAT_N" --json 2>"$tmp/taskmesh.log" || { cat "$tmp/taskmesh.log" >&2; exit 1; }; } | python3 -c '
import json,sys; d=json.load(sys.stdin)
print(json.dumps({"system":"taskmesh","workload":"latency","n":d["n"],"rate":d["rate"],
 "p50_ms":d["p50_ms"],"p95_ms":d["p95_ms"],"p99_ms":d["p99_ms"],"max_ms":d["max_ms"]}))' | record

# --- Celery --------------------------------------------------------------------------------
for pool in prefork threads; do
  log "celery $pool drain (n=$CELERY_N)"
  (cd "$here" && .venv/bin/python celery_bench.py drain --pool "$pool" --n "$CELERY_N") | record
  log "celery $pool idle latency"
  (cd "$here" && .venv/bin/python celery_bench.py latency --pool "$pool" --n "$LAT_N" --rate "$LAT_RATE") | record
done

# --- BullMQ --------------------------------------------------------------------------------
log "bullmq drain (n=$BULLMQ_N, concurrency 50)"
(cd "$here" && node bullmq_bench.mjs drain --redis-port "$port" --n "$BULLMQ_N") | record
log "bullmq idle latency"
(cd "$here" && node bullmq_bench.mjs latency --redis-port "$port" --n "$LAT_N" --rate "$LAT_RATE") | record

# --- table ---------------------------------------------------------------------------------
python3 - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
drain = {r["system"]: r for r in rows if r["workload"] == "drain"}
lat = {r["system"]: r for r in rows if r["workload"] == "latency"}
tm_d = drain["taskmesh"]["tasks_per_sec"]
tm_l = lat["taskmesh"]["p99_ms"]
print(f'{"system":<16} {"drain tasks/s":>14} {"taskmesh x":>11} {"idle p50 ms":>12} {"idle p99 ms":>12} {"p99 / taskmesh":>15}')
for s in ["taskmesh", "celery-prefork", "celery-threads", "bullmq"]:
    d, l = drain.get(s), lat.get(s)
    dr = d["tasks_per_sec"] if d else float("nan")
    print(f'{s:<16} {dr:>14.0f} {tm_d / dr:>11.1f} {l["p50_ms"]:>12.3f} {l["p99_ms"]:>12.3f} {l["p99_ms"] / tm_l:>15.1f}')
print("(drain: N no-op tasks stored first, then consumed, results off; taskmesh x = taskmesh drain rate / peer's;")
print(" idle latency: enqueue -> handler start, one task at a time on an idle worker)")
EOF
