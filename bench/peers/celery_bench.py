"""Celery side of taskmesh's peer benchmarks (run by bench/peers/run.sh).

Two workloads against a Redis broker, results off (ignore_result):
  drain   -- store N no-op tasks first, then start the worker; rate = tasks / (last done -
             first done), so worker start-up does not count.
  latency -- an idle worker; tasks enqueued one by one at --rate per second, each reports
             enqueue -> task start (wall clock, same machine).
Completion is counted with one Redis INCR per task (a no-op Celery task cannot be observed
otherwise without a result backend); that costs ~0.05 ms against Celery's ~1 ms per task.

usage: celery_bench.py drain|latency --redis URL --pool prefork|threads [--n N] [--rate R]
prints one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import redis
from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("celery_bench", broker=REDIS_URL)
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
)
_r = None


def _redis():
    global _r
    if _r is None:
        _r = redis.Redis.from_url(REDIS_URL)
    return _r


@app.task(name="bench.noop", ignore_result=True)
def noop():
    _redis().incr("bench:done")


@app.task(name="bench.stamp", ignore_result=True)
def stamp(t):
    _redis().rpush("bench:lat", time.time() - t)


def start_worker(pool, concurrency):
    env = dict(os.environ, BENCH_REDIS_URL=REDIS_URL)
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_bench", "worker", "-P", pool,
         "-c", str(concurrency), "--loglevel", "WARNING", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_worker(p):
    p.terminate()
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()


def drain(n, pool, concurrency):
    r = _redis()
    r.delete("bench:done", "celery")
    t0 = time.time()
    with app.producer_pool.acquire(block=True) as prod:
        for _ in range(n):
            noop.apply_async(producer=prod)
    enqueue_s = time.time() - t0
    w = start_worker(pool, concurrency)
    try:
        first = None
        deadline = time.time() + 600
        while True:
            done = int(r.get("bench:done") or 0)
            now = time.time()
            if done > 0 and first is None:
                first, first_done = now, done
            if done >= n:
                break
            if now > deadline:
                raise SystemExit(f"celery drain: only {done} of {n} done in 600 s")
            time.sleep(0.005)
        rate = (n - first_done) / max(now - first, 1e-9)
    finally:
        stop_worker(w)
    return {"system": f"celery-{pool}", "workload": "drain", "n": n,
            "concurrency": concurrency, "tasks_per_sec": round(rate),
            "enqueue_per_sec": round(n / enqueue_s)}


def latency(n, rate, pool, concurrency):
    r = _redis()
    r.delete("bench:lat", "celery")
    w = start_worker(pool, concurrency)
    try:
        time.sleep(4)  # worker start-up
        stamp.delay(time.time())  # warm-up
        time.sleep(0.5)
        r.delete("bench:lat")
        start = time.time()
        for i in range(n):
            due = start + i / rate
            d = due - time.time()
            if d > 0:
                time.sleep(d)
            stamp.delay(time.time())
        deadline = time.time() + 60
        while r.llen("bench:lat") < n and time.time() < deadline:
            time.sleep(0.01)
        v = sorted(float(x) * 1000 for x in r.lrange("bench:lat", 0, -1))
    finally:
        stop_worker(w)
    q = lambda p: v[min(len(v) - 1, round((len(v) - 1) * p))]
    return {"system": f"celery-{pool}", "workload": "latency", "n": len(v), "rate": rate,
            "p50_ms": round(q(0.5), 3), "p95_ms": round(q(0.95), 3),
            "p99_ms": round(q(0.99), 3), "max_ms": round(v[-1], 3)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=["drain", "latency"])
    ap.add_argument("--pool", default="prefork")
    ap.add_argument("--concurrency", type=int, default=0)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=50.0)
    a = ap.parse_args()
    c = a.concurrency or (os.cpu_count() if a.pool == "prefork" else 16)
    if a.workload == "drain":
        print(json.dumps(drain(a.n, a.pool, c)))
    else:
        print(json.dumps(latency(a.n, a.rate, a.pool, c)))
