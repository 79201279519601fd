// BullMQ side of taskmesh's peer benchmarks (run by bench/peers/run.sh).
//   drain   -- add N no-op jobs (addBulk), then start a Worker (concurrency 50);
//              rate = jobs / (last done - first done).
//   latency -- an idle Worker; jobs added one by one at --rate per second; enqueue -> job
//              start (performance clock, producer and worker in this one process).
// removeOnComplete / removeOnFail: no results kept (taskmesh's "results off").
// usage: node bullmq_bench.mjs drain|latency --redis-port P [--n N] [--rate R] [--concurrency C]
import { Queue, Worker } from "bullmq";
import { performance } from "node:perf_hooks";

const args = process.argv.slice(2);
const workload = args[0];
const opt = (name, def) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? Number(args[i + 1]) : def;
};
const port = opt("redis-port", 6379);
const n = opt("n", 50000);
const rate = opt("rate", 50);
const concurrency = opt("concurrency", 50);
const connection = { host: "127.0.0.1", port, maxRetriesPerRequest: null };
const name = `bench-${process.pid}`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const jobOpts = { removeOnComplete: true, removeOnFail: true };

async function drain() {
  const queue = new Queue(name, { connection });
  const t0 = performance.now();
  for (let i = 0; i < n; i += 1000) {
    const m = Math.min(1000, n - i);
    await queue.addBulk(Array.from({ length: m }, () => ({ name: "noop", data: {}, opts: jobOpts })));
  }
  const enqueueS = (performance.now() - t0) / 1000;
  let done = 0, first = 0, last = 0;
  let finish;
  const finished = new Promise((r) => (finish = r));
  const worker = new Worker(name, async () => {
    const now = performance.now();
    if (done === 0) first = now;
    done += 1;
    if (done === n) { last = now; finish(); }
  }, { connection, concurrency });
  await finished;
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  return { system: "bullmq", workload: "drain", n, concurrency,
    tasks_per_sec: Math.round((n - 1) / ((last - first) / 1000)),
    enqueue_per_sec: Math.round(n / enqueueS) };
}

async function latency() {
  const queue = new Queue(name, { connection });
  const lat = [];
  const worker = new Worker(name, async (job) => {
    lat.push(performance.now() - job.data.t);
  }, { connection, concurrency });
  await worker.waitUntilReady();
  await sleep(1000);
  await queue.add("stamp", { t: performance.now() }, jobOpts); // warm-up
  await sleep(500);
  lat.length = 0;
  const start = performance.now();
  for (let i = 0; i < n; i++) {
    const d = start + (i * 1000) / rate - performance.now();
    if (d > 0) await sleep(d);
    await queue.add("stamp", { t: performance.now() }, jobOpts);
  }
  const deadline = performance.now() + 60000;
  while (lat.length < n && performance.now() < deadline) await sleep(10);
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  lat.sort((a, b) => a - b);
  const q = (p) => lat[Math.min(lat.length - 1, Math.round((lat.length - 1) * p))];
  const r3 = (x) => Math.round(x * 1000) / 1000;
  return { system: "bullmq", workload: "latency", n: lat.length, rate,
    p50_ms: r3(q(0.5)), p95_ms: r3(q(0.95)), p99_ms: r3(q(0.99)), max_ms: r3(lat[lat.length - 1]) };
}

const out = workload === "drain" ? await drain() : await latency();
console.log(JSON.stringify(out));
process.exit(0);
