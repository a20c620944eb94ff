"""Latency and load of the ranking service (``mtrec serve``) against "the plain way", on localhost.

Run by hand (not part of the tests); it trains the runs it lacks on the embedded Census data:

    .venv/bin/python benchmarks/serve.py --runs runs/bench --duration 3 --rounds 3   # medians of 3 rounds
    .venv/bin/python benchmarks/serve.py --runs runs/bench --models mmoe --candidates 10 --clients 1,8 --duration 2  # smoke

For every model x backend it starts the real server (``mtrec serve``, one worker by default) and, for the
comparison, plain servers (``--plain-server`` of this script: FastAPI's standard ``await request.json()``,
the context columns copied into every candidate row, one PyTorch forward, ``JSONResponse``), the rows
encoded either as ``predict`` encodes a file (``plain/file``: a polars frame through
``mtrec.data.ingest.encode``) or with the service's column-wise encoder (``plain/columns``: then only the
user-side dedup, the JSON parser and the response writer differ from the service). Closed-loop clients
(threads, one keep-alive connection each, the request body serialised once) send real Census rows:
10 / 100 / 500 candidates carrying every column, the user side (``--context``) in ``context`` for
mtrec (the ONNX backend scores them with ``RUN/model.context.onnx``, exported here when the run has
none) and copied per row for the plain server. Reported per cell: requests and candidates per second,
client p50 / p99 latency, and from the ``Server-Timing`` header the server's own time (parse, encode,
model, total), so the HTTP and client overhead is latency minus the server total.

On a 2-core machine the clients share the cores with the server: the figures are end to end on one box.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import Request  # at module level: the handler's annotation is resolved here

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTEXT = [
    "age",
    "sex",
    "race",
    "education",
    "citizenship",
    "birth_country",
    "father_country",
    "mother_country",
    "hispanic_origin",
    "marital_status",
]  # user-side columns of Census (those the schema reads)


# ---- the plain way --------------------------------------------------------------------------------


def plain_app(run: Path, encoder: str = "file"):
    """One PyTorch forward per request on per-candidate rows (context copied into every row), the
    standard JSON path; same calibration and fusion as the service. ``encoder``: ``file``, the rows
    in a polars frame through ``mtrec.data.ingest.encode`` (what ``predict`` does with a file), or
    ``columns``, the rows through the service's column-wise encoder (so only the user-side dedup, the
    JSON parser and the response writer differ from the service)."""
    import polars as pl
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from mtrec.data.ingest import encode
    from mtrec.data.store import table_from_arrays
    from mtrec.fusion.calibration import Calibrators
    from mtrec.fusion.spec import apply_fusion, fusion_for_run
    from mtrec.serve.encoding import RequestEncoder
    from mtrec.train.run import load_run

    loaded = load_run(run)
    calibrators = Calibrators.load(run)
    spec = fusion_for_run(run, loaded.model.layout, calibrators.method)
    seq_columns = {f.source_column: f.separator for f in loaded.schema.features_of("sequence")}
    names = loaded.model.task_names
    columns = RequestEncoder(loaded.schema, loaded.encoders, 1 << 20)
    app = FastAPI()

    @app.post("/rank")
    async def rank(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        body = await request.json()
        t1 = time.perf_counter()
        rows = [{**body.get("context", {}), **c} for c in body["candidates"]]
        if encoder == "columns":
            batch = columns.encode({"candidates": rows})
            table = table_from_arrays(
                {
                    "sparse": batch.sparse,
                    "dense": batch.dense,
                    "labels": np.zeros((batch.size, len(names)), np.float32),
                    **{f"seq.{k}": v for k, v in batch.sequences.items()},
                }
            )
        else:
            for row in rows:
                for column, sep in seq_columns.items():
                    row[column] = sep.join(map(str, row[column] or []))
            frame = pl.DataFrame(rows, infer_schema_length=None)
            table = table_from_arrays(
                encode(frame, loaded.schema, loaded.encoders, Path("<request>"), with_labels=False)
            )
        t2 = time.perf_counter()
        with torch.inference_mode():
            raw = loaded.model.predict_table(table)
        t3 = time.perf_counter()
        scores = calibrators.apply(raw)
        fused = apply_fusion(scores, spec) if spec is not None else scores[:, 0]
        order = np.argsort(-fused, kind="stable")
        ranking = [
            {"index": int(i), "score": float(fused[i]), "scores": {n: float(scores[i, t]) for t, n in enumerate(names)}}
            for i in order
        ]
        response = JSONResponse({"ranking": ranking})
        t4 = time.perf_counter()
        timing = {"parse": t1 - t0, "encode": t2 - t1, "model": t3 - t2, "total": t4 - t0}
        response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timing.items())
        return response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "worker": os.getpid()}

    return app


PLAIN_ENV = "MTREC_BENCH_PLAIN"  # the plain server's settings, as JSON, for its worker processes


def plain_from_env():
    """App factory of a plain server's worker (``--workers`` > 1 goes through uvicorn's import string)."""
    import torch

    settings = json.loads(os.environ[PLAIN_ENV])
    torch.set_num_threads(settings["threads"])
    return plain_app(Path(settings["run"]), settings["encoder"])


# ---- servers and clients --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict, workers: int = 1) -> subprocess.Popen:
    """Start a server and wait until ``workers`` worker processes answer ``/health`` (each request on a new
    connection): the clients' keep-alive connections, opened next, stay with the worker that accepted
    them, so connecting while a worker is still starting would leave it idle for the whole cell."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300  # an ONNX backend exports its graph first
    seen: set[int] = set()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {' '.join(cmd)} exited: {proc.stderr.read()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            response = conn.getresponse()
            if response.status == 200:
                seen.add(json.loads(response.read())["worker"])
                if len(seen) >= workers:
                    return proc
            conn.close()
            time.sleep(0.05)
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server {' '.join(cmd)} did not come up with {workers} worker(s)")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def server_timing(header: str | None) -> dict[str, float]:
    out = {}
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def load(port: int, body: bytes, clients: int, duration: float, warmup: float) -> dict:
    """Closed loop: ``clients`` threads each send ``body`` back to back for ``warmup + duration`` s;
    only requests started after the warm-up count."""
    lat: list[float] = []
    timings: list[dict] = []
    errors = [0]
    lock = threading.Lock()
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    headers = {"Content-Type": "application/json"}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, my_timings, my_errors = [], [], 0
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            conn.request("POST", "/rank", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            t1 = time.perf_counter()
            if t0 >= t_measure:
                if response.status != 200:  # counted apart, never as throughput
                    my_errors += 1
                    continue
                mine.append(t1 - t0)
                my_timings.append(server_timing(response.getheader("Server-Timing")))
        conn.close()
        with lock:
            lat.extend(mine)
            timings.extend(my_timings)
            errors[0] += my_errors

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat_ms = np.array(lat) * 1000
    server = (
        {k: float(np.mean([t.get(k, np.nan) for t in timings])) for k in ("parse", "encode", "model", "total")}
        if timings
        else {}
    )
    return {
        "requests": len(lat),
        "errors": errors[0],
        "rps": len(lat) / duration,
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat) else float("nan"),
        "server_ms": server,
    }


def ensure_run(runs: Path, model: str, epochs: int, env: dict) -> Path:
    out = runs / model
    if not (out / "metrics.json").is_file():
        print(f"training {model} on census ({epochs} epoch(s)) into {out}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mtrec.cli",
                "train",
                "--dataset",
                "census",
                "--model",
                model,
                "--epochs",
                str(epochs),
                "--no-tensorboard",
                "--out",
                str(out),
            ],
            check=True,
            env=env,
        )
    return out


def ensure_context_graph(run: Path, context: list[str], env: dict) -> None:
    """Export ``RUN/model.context.onnx`` with the features reading the ``context`` columns as batch-1
    context inputs, when the run has none (the service itself exports a stale one again)."""
    from mtrec.serve.export import CONTEXT_ONNX_FILE
    from mtrec.train.run import load_run

    if (run / CONTEXT_ONNX_FILE).is_file():
        return
    features = [f.name for f in load_run(run).schema.features if f.source_column in context]
    if not features:
        return
    cmd = [sys.executable, "-m", "mtrec.cli", "export", "--run", str(run), "--format", "onnx"]
    subprocess.run([*cmd, "--context-features", ",".join(features)], check=True, env=env)


def bodies(run: Path, sizes: list[int], context: list[str]) -> dict[int, tuple[bytes, bytes]]:
    """Per size: (mtrec body with the context once, plain body with every column per candidate)."""
    import polars as pl

    from mtrec.data.ingest import read_frame
    from mtrec.serve.encoding import request_from_frame
    from mtrec.train.run import load_run

    schema = load_run(run).schema
    read = {f.source_column for f in schema.features}
    context = [c for c in context if c in read]
    frame = read_frame(Path(schema.source.test or schema.source.train), schema).head(max(sizes))
    out = {}
    for n in sizes:
        rows = frame.head(n).with_columns([pl.lit(frame[c][0]).alias(c) for c in context])
        out[n] = (
            json.dumps(request_from_frame(rows, schema, context)).encode(),
            json.dumps(request_from_frame(rows, schema, [])).encode(),
        )
    return out


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, server, candidates, clients): the median over rounds of every figure."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["server"], r["candidates"], r["clients"]), []).append(r)
    out = []
    for (model, server, n, clients), rs in groups.items():
        med = lambda key, rs=rs: float(np.median([r[key] for r in rs]))  # noqa: E731
        timing = {
            k: float(np.median([r["server_ms"].get(k, np.nan) for r in rs]))
            for k in ("parse", "encode", "model", "total")
        }
        out.append(
            {
                "model": model,
                "server": server,
                "candidates": n,
                "clients": clients,
                "rounds": len(rs),
                "rps": med("rps"),
                "candidates_per_s": med("candidates_per_s"),
                "p50_ms": med("p50_ms"),
                "p99_ms": med("p99_ms"),
                "server_ms": timing,
                "errors": sum(r["errors"] for r in rs),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--runs", type=Path, default=REPO / "runs" / "bench_serve", help="folder of the runs (trained when missing)"
    )
    ap.add_argument("--models", default="mmoe,ple")
    ap.add_argument(
        "--backends",
        default="torch,onnx",
        help="mtrec servers to run: torch, onnx, or onnx:MODE for `mtrec serve --ort-spin MODE` (e.g. onnx:on)",
    )
    ap.add_argument("--candidates", default="10,100,500")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every server's cells this many times, the servers in a "
        "rotated order each round; figures are medians over the rounds",
    )
    ap.add_argument("--epochs", type=int, default=1, help="epochs of a run trained here (speed does not depend on it)")
    ap.add_argument(
        "--workers", type=int, default=1, help="worker processes of every server, mtrec's and the plain ones"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads per server worker (default: cores / workers)"
    )
    ap.add_argument("--context", default=",".join(CONTEXT))
    ap.add_argument("--plain", default="file,columns", help="plain-way baselines to run (file, columns; '' for none)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--encoder", default="file", help=argparse.SUPPRESS)
    args = ap.parse_args()

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    if args.plain_server:
        import uvicorn

        common = dict(host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
        os.environ[PLAIN_ENV] = json.dumps({"run": str(args.run), "encoder": args.encoder, "threads": threads})
        if args.workers == 1:
            uvicorn.run(plain_from_env(), **common)
        else:  # as many worker processes as mtrec's server gets, each with the same threads
            uvicorn.run(
                "serve:plain_from_env", factory=True, workers=args.workers, app_dir=str(Path(__file__).parent), **common
            )
        return

    env = dict(os.environ)
    sizes = [int(x) for x in args.candidates.split(",")]
    client_counts = [int(x) for x in args.clients.split(",")]
    results = []
    print(
        f"machine: {os.cpu_count()} cores; server: {args.workers} worker(s) x {threads} thread(s); "
        f"{args.duration:g} s per cell after {args.warmup:g} s warm-up",
        flush=True,
    )
    header = (
        f"{'model':<6} {'server':<12} {'cands':>5} {'clients':>7} {'req/s':>8} {'cands/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'parse':>6} {'encode':>6} {'model':>6} {'server':>6} {'http+client':>11}"
    )
    for model in args.models.split(","):
        run = ensure_run(args.runs, model, args.epochs, env)
        context = [c for c in args.context.split(",") if c]
        if any(b.startswith("onnx") for b in args.backends.split(",")):
            ensure_context_graph(run, context, env)
        payloads = bodies(run, sizes, context)
        servers = [
            (
                f"mtrec/{b}",
                [
                    sys.executable,
                    "-m",
                    "mtrec.cli",
                    "serve",
                    "--run",
                    str(run),
                    "--backend",
                    b.partition(":")[0],
                    *(["--ort-spin", b.partition(":")[2]] if ":" in b else []),
                    "--workers",
                    str(args.workers),
                    "--threads",
                    str(threads),
                    "--timeout-ms",
                    "60000",
                ],
            )
            for b in args.backends.split(",")
        ]
        for kind in filter(None, args.plain.split(",")):
            servers.append(
                (
                    f"plain/{kind}",
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--plain-server",
                        "--run",
                        str(run),
                        "--threads",
                        str(threads),
                        "--workers",
                        str(args.workers),
                        "--encoder",
                        kind,
                    ],
                )
            )
        print(header, flush=True)
        order = [servers[(i + rnd) % len(servers)] for rnd in range(args.rounds) for i in range(len(servers))]
        for name, cmd in order:
            port = free_port()
            proc = start([*cmd, "--port", str(port)], port, env, args.workers)
            try:
                for n in sizes:
                    body = payloads[n][1 if name.startswith("plain") else 0]
                    for clients in client_counts:
                        r = load(port, body, clients, args.duration, args.warmup)
                        s = r["server_ms"]
                        overhead = r["p50_ms"] - s.get("total", float("nan"))
                        row = {
                            "model": model,
                            "server": name,
                            "candidates": n,
                            "clients": clients,
                            **r,
                            "candidates_per_s": r["rps"] * n,
                            "body_bytes": len(body),
                        }
                        results.append(row)
                        print(
                            f"{model:<6} {name:<12} {n:>5} {clients:>7} {r['rps']:>8.1f} {r['rps'] * n:>9.0f} {r['p50_ms']:>8.2f} "
                            f"{r['p99_ms']:>8.2f} {s.get('parse', np.nan):>6.2f} {s.get('encode', np.nan):>6.2f} "
                            f"{s.get('model', np.nan):>6.2f} {s.get('total', np.nan):>6.2f} {overhead:>11.2f}"
                            + (f"  ({r['errors']} errors)" if r["errors"] else ""),
                            flush=True,
                        )
            finally:
                stop(proc)
    raw, results = results, median_rows(results)
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds:\n{header}")
        for r in results:
            s = r["server_ms"]
            print(
                f"{r['model']:<6} {r['server']:<12} {r['candidates']:>5} {r['clients']:>7} {r['rps']:>8.1f} "
                f"{r['candidates_per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {s['parse']:>6.2f} {s['encode']:>6.2f} "
                f"{s['model']:>6.2f} {s['total']:>6.2f} {r['p50_ms'] - s['total']:>11.2f}"
            )
    for kind in filter(None, args.plain.split(",")):
        print(f"\ncandidates scored per second, mtrec / plain/{kind} (same model, candidates, clients):")
        plain = {
            (r["model"], r["candidates"], r["clients"]): r["candidates_per_s"]
            for r in results
            if r["server"] == f"plain/{kind}"
        }
        for r in results:
            key = (r["model"], r["candidates"], r["clients"])
            if not r["server"].startswith("plain") and plain.get(key):
                print(
                    f"  {r['model']:<6} {r['server']:<12} {r['candidates']:>4} cands {r['clients']:>3} clients: "
                    f"{r['candidates_per_s'] / plain[key]:.2f}x"
                )
    if args.out:
        args.out.write_text(json.dumps({"rounds": args.rounds, "medians": results, "runs": raw}, indent=2))


if __name__ == "__main__":
    main()
