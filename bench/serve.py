"""Benchmark: `recalign serve` under a bounded load on 127.0.0.1.

A real server (`recalign serve CF_RUN LLM_RUN`, a subprocess) and an asyncio HTTP load generator (httpx):
p50 / p95 / p99 latency and requests/s at concurrency 1, 8 and 32 for the CF run (`/recommend`, k = 10,
whole catalogue) and the TALLRec run (`/score`, one item: one prompt per request), with micro-batching on
(`--max-batch 32 --max-wait-ms 5`) and off (`--max-batch 1`); the LLM served in int8 (`--quantize int8`)
at the highest concurrency. In-process: the TALLRec run's test samples scored in float32 and int8 (samples/s,
AUC) and the warm/cold router study (`recalign route`: the LLM's share of requests, routed AUC vs each model).

Every level is bounded by a request count and a time limit. Without --cf-run / --llm-run the two runs are
made once under --work (MF in CTR mode on ML-100K; TALLRec with the embedded SmolLM2, 64 shots, one epoch,
200 test samples) and reused afterwards.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/serve.py [--work /tmp/recalign-bench-serve]
        [--cf-run DIR --llm-run DIR] [--parts server,int8,route,kernel] [--dtype float32] [--levels 1,8,32]
        [--cf-requests 300] [--llm-requests 24,96,192] [--max-seconds 120] [--int8-samples 100]
        [--kernel-prompts 32] [--kernel-rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "serve.json"
VENV_BIN = Path(sys.executable).parent


def make_runs(work: Path) -> tuple[Path, Path]:
    from recalign.runner import run_method

    cf, llm = work / "mf-ctr", work / "tallrec-64"
    if not (cf / "metrics.json").exists():
        run_method("mf", "ml-100k", cf, sets=["protocol=ctr", "train.epochs=20", "train.max_minutes=0.5"], resume=True)
    if not (llm / "metrics.json").exists():
        run_method("tallrec", "ml-100k", llm, sets=["train.shots=64", "train.epochs=1", "samples.test_size=200",
                                                    "samples.valid_size=32"], resume=True)
    return cf, llm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, runs, *flags):
        self.port = free_port()
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RECALIGN_QUIET": "1"}
        self.proc = subprocess.Popen([str(VENV_BIN / "recalign"), "serve", *map(str, runs), "--host", "127.0.0.1",
                                      "--port", str(self.port), *flags], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not come up in 300 s")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"{self.base}/metrics", timeout=30).text


async def _load(base: str, path: str, bodies: list, concurrency: int, max_seconds: float) -> dict:
    import httpx

    latencies, errors, cursor = [], 0, 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        for body in bodies[:2]:  # warm-up, not counted
            await client.post(path, json=body)
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker():
            nonlocal cursor, errors
            while cursor < len(bodies) and time.perf_counter() < deadline:
                body = bodies[cursor]
                cursor += 1
                t = time.perf_counter()
                response = await client.post(path, json=body)
                latencies.append(time.perf_counter() - t)
                errors += response.status_code != 200

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": int(errors), "seconds": wall,
            "rps": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99))}


def load(server: Server, path: str, bodies: list, concurrency: int, max_seconds: float) -> dict:
    result = asyncio.run(_load(server.base, path, bodies, concurrency, max_seconds))
    print(f"  {path} c={concurrency}: {result['requests']} requests, {result['rps']:.2f} req/s, "
          f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, errors {result['errors']}", flush=True)
    return result


def batch_stats(metrics_text: str, model: str) -> dict:
    """Mean rows and requests per model call from the server's Prometheus histograms."""
    values = {}
    for line in metrics_text.splitlines():
        for name in ("recalign_batch_rows", "recalign_batch_requests"):
            for suffix in ("_sum", "_count"):
                if line.startswith(f'{name}{suffix}{{model="{model}"}}'):
                    values[name + suffix] = float(line.split()[-1])
    calls = values.get("recalign_batch_rows_count", 0.0)
    return {"calls": calls, "rows_per_call": values.get("recalign_batch_rows_sum", 0.0) / calls if calls else None,
            "requests_per_call": values.get("recalign_batch_requests_sum", 0.0) / calls if calls else None}


def score_test_set(llm_run: Path, dtype: str | None, quantize: str, samples: int) -> dict:
    """The first `samples` test samples of the TALLRec run scored by the served model (batches of 32)."""
    from recalign.serve import LoadOptions, load_runs
    from recalign.tasks.ctr import ctr_report, tallrec_protocol

    served = load_runs([llm_run], LoadOptions(dtype=dtype, quantize=quantize, max_batch=32))[0]
    test = tallrec_protocol(served.catalog.ds, served.config["samples"]).test.head(samples)
    rows = [(int(u), tuple(h), tuple(hl), int(i)) for u, h, hl, i in
            zip(test["user"], test["history"], test["history_labels"], test["item"])]
    served.run_rows(rows[:4])  # warm-up (int8: quantises the layers on first use)
    started = time.perf_counter()
    scores = np.asarray(served.run_rows(rows))
    seconds = time.perf_counter() - started
    return {"dtype": served.backbone.precision["dtype"], "quantize": quantize, "samples": len(rows),
            "samples_per_s": len(rows) / seconds, "auc": ctr_report(test, scores)["auc"], "scores": scores.tolist()}


def batching_kernel(llm_run: Path, prompts: int, rounds: int, dtype: str | None = None) -> dict:
    """The batching effect without HTTP and without the load generator: the same `prompts` one-item requests
    of different users scored one by one (what the server does with --max-batch 1) and as one micro-batch
    (--max-batch 32), rounds interleaved so that load from other processes hits both alike; medians."""
    from recalign.serve import LoadOptions, load_runs
    from recalign.tasks.ctr import tallrec_protocol

    served = load_runs([llm_run], LoadOptions(dtype=dtype, max_batch=max(32, prompts)))[0]
    data = tallrec_protocol(served.catalog.ds, served.config["samples"])
    frame = data.test.drop_duplicates("user").head(prompts)
    rows = [(int(u), tuple(h), tuple(hl), int(i)) for u, h, hl, i in
            zip(frame["user"], frame["history"], frame["history_labels"], frame["item"])]
    served.run_rows(rows[:2])  # warm-up
    times = {"one_by_one": [], "one_batch": []}
    for _ in range(rounds):
        started = time.perf_counter()
        alone = [served.run_rows([row])[0] for row in rows]
        times["one_by_one"].append(time.perf_counter() - started)
        started = time.perf_counter()
        together = served.run_rows(rows)
        times["one_batch"].append(time.perf_counter() - started)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"dtype": served.backbone.precision["dtype"], "prompts": len(rows), "rounds": rounds, "seconds": times,
            "prompts_per_s": {k: len(rows) / v for k, v in med.items()},
            "speedup": med["one_by_one"] / med["one_batch"],
            "max_abs_diff": float(np.max(np.abs(np.subtract(alone, together))))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/recalign-bench-serve"))
    parser.add_argument("--cf-run", type=Path)
    parser.add_argument("--llm-run", type=Path)
    parser.add_argument("--parts", default="server,int8,route,kernel",
                        help="server (HTTP load), int8 (float32 vs int8 scoring), route (router study), kernel "
                             "(batching in-process); results are merged into --out")
    parser.add_argument("--dtype", default=None, help="model.dtype for the LLM in the server, route and kernel "
                                                      "parts (default: the run's own, auto)")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--cf-requests", type=int, default=300)
    parser.add_argument("--llm-requests", default="24,96,192", help="requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time limit per level")
    parser.add_argument("--int8-samples", type=int, default=100)
    parser.add_argument("--kernel-prompts", type=int, default=32)
    parser.add_argument("--kernel-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    parts = set(args.parts.split(","))
    levels = [int(x) for x in args.levels.split(",")]
    llm_counts = [int(x) for x in args.llm_requests.split(",")]
    if len(llm_counts) != len(levels):
        parser.error("--llm-requests needs one count per level")
    cf_run, llm_run = args.cf_run, args.llm_run
    if cf_run is None or llm_run is None:
        made = make_runs(args.work)
        cf_run, llm_run = cf_run or made[0], llm_run or made[1]
    cf_name, llm_name = cf_run.resolve().name, llm_run.resolve().name

    from recalign.serve import LoadOptions, load_runs

    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    dtype_flags = ["--dtype", args.dtype] if args.dtype else []

    if "server" in parts:
        catalog = load_runs([cf_run], LoadOptions())[0].catalog
        rng = np.random.default_rng(0)
        users = [catalog.user_raw[u] for u in rng.integers(0, catalog.n_users, 2000)]
        items = [catalog.item_raw[i] for i in rng.integers(0, catalog.n_items, 2000)]
        cf_bodies = [{"user": u, "k": 10, "model": cf_name} for u in users]
        llm_bodies = [{"user": u, "items": [i], "model": llm_name} for u, i in zip(users, items)]
        result = {"machine": {**machine, "load_average_start": os.getloadavg()}, "command": " ".join(sys.argv),
                  "cf_run": str(cf_run), "llm_run": str(llm_run), "dtype": args.dtype or "the run's (auto)",
                  "cf": [], "llm": {"batched": [], "unbatched": [], "int8_batched": []}}
        configs = [("batched", ["--max-batch", "32", "--max-wait-ms", "5", *dtype_flags]),
                   ("unbatched", ["--max-batch", "1", "--max-wait-ms", "0", *dtype_flags]),
                   ("int8_batched", ["--max-batch", "32", "--max-wait-ms", "5", "--quantize", "int8"])]
        for label, flags in configs:
            print(f"server: {label}", flush=True)
            with Server([cf_run, llm_run], *flags) as server:
                if label == "batched":
                    result["cf"] = [load(server, "/recommend", cf_bodies[:args.cf_requests], c, args.max_seconds)
                                    for c in levels]
                pairs = list(zip(levels, llm_counts)) if label != "int8_batched" else [(levels[-1], llm_counts[-1])]
                for c, n in pairs:
                    result["llm"][label].append(load(server, "/score", llm_bodies[:n], c, args.max_seconds))
                result["llm"][f"{label}_batches"] = batch_stats(server.metrics(), llm_name)
        result["machine"]["load_average_end"] = os.getloadavg()
        out["server"] = result
        print(markdown(result), flush=True)
    if "int8" in parts:
        fp32 = score_test_set(llm_run, "float32", "none", args.int8_samples)
        int8 = score_test_set(llm_run, "float32", "int8", args.int8_samples)
        out["int8"] = {"run": str(llm_run), "machine": {**machine, "load_average": os.getloadavg()},
                       "float32": {k: v for k, v in fp32.items() if k != "scores"},
                       "int8": {k: v for k, v in int8.items() if k != "scores"},
                       "speedup": int8["samples_per_s"] / fp32["samples_per_s"],
                       "delta_auc": int8["auc"] - fp32["auc"],
                       "max_abs_score_diff": float(np.max(np.abs(np.subtract(fp32["scores"], int8["scores"]))))}
        print(f"int8 vs float32 on {fp32['samples']} samples: {out['int8']['speedup']:.2f}x samples/s, "
              f"AUC {fp32['auc']:.4f} -> {int8['auc']:.4f}", flush=True)
    if "route" in parts:
        from recalign.serve import evaluate_routing, routing_markdown

        models = load_runs([cf_run, llm_run], LoadOptions(dtype=args.dtype))
        route = evaluate_routing(models[0], models[1])
        route["machine"] = {**machine, "load_average": os.getloadavg()}
        route["dtype"] = models[1].backbone.precision["dtype"]
        out.setdefault("route", {})[route["dtype"]] = route
        print(routing_markdown(route), flush=True)
    if "kernel" in parts:
        kernel = batching_kernel(llm_run, args.kernel_prompts, args.kernel_rounds, args.dtype)
        kernel["machine"] = {**machine, "load_average": os.getloadavg()}
        out.setdefault("kernel", {})[kernel["dtype"]] = kernel
        print(json.dumps({k: v for k, v in kernel.items() if k != "seconds"}, indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {args.out}")


def markdown(out: dict) -> str:
    lines = ["| model | batching | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("CF (/recommend)", "-", r) for r in out["cf"]]
    rows += [("TALLRec (/score)", label, r) for label in ("batched", "unbatched", "int8_batched")
             for r in out["llm"].get(label, [])]
    for name, label, r in rows:
        lines.append(f"| {name} | {label} | {r['concurrency']} | {r['requests']} | {r['rps']:.2f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} |")
    on = {r["concurrency"]: r["rps"] for r in out["llm"]["batched"]}
    off = {r["concurrency"]: r["rps"] for r in out["llm"]["unbatched"]}
    lines.append("")
    lines.append("micro-batching speed-up (LLM req/s on / off): " + ", ".join(
        f"c={c}: {on[c] / off[c]:.2f}x" for c in on if c in off and off[c]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
