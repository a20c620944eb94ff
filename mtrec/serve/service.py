"""The ranking service: ``mtrec serve`` (FastAPI + uvicorn).

Endpoints:

- ``POST /rank`` ``{"context": {column: value}, "candidates": [{column: value}, ...]}`` ->
  ``{"ranking": [{"index": i, "score": fused, "scores": {task: score}}, ...]}``, best first. ``scores``
  holds every task (calibrated when the run has a calibrator) and ``<task>@all`` for a task with a
  space, as ``mtrec predict`` writes them; ``score`` is the fused score (the run's ``fusion.yaml`` or
  ``--fusion``), else the first task's. Ties keep the request's order. The ``Server-Timing`` header
  gives the time spent parsing, encoding, in the model and in all (milliseconds).
- ``GET /health``, ``GET /model`` (model, tasks, fusion, calibration, versions, when trained, the
  run's test metrics, the columns read), ``GET /metrics`` (Prometheus text).
- ``POST /reload`` ``{"run": DIR, "fusion": FILE}`` loads another run beside the one serving, then
  swaps it in: a request in flight finishes on the ranker it started with. With several workers the
  new run is written to a shared state file that every worker polls (and reads when it restarts).
  ``SIGHUP`` to a worker (the server, with one worker) reloads the serving run from its directory;
  to the supervisor of several workers, uvicorn restarts the workers one by one.

A bad request gets a 4xx ``{"detail": "<field>: <reason>", "field": "<field>"}``: 400 malformed JSON,
413 a body above the size limit, 422 anything else; a request that waits or runs past the timeout
gets 503. The model work runs on one thread per worker, on ``threads`` torch threads under mtrec's thread
policy (:func:`mtrec.threads.apply_thread_policy`), so requests queue instead of oversubscribing the cores.

With the ONNX backend, ONNX Runtime's threads spin while requests queue (``ort_spin="auto"``): from one
run to the next they stay awake, which is fastest when the next request is already waiting (at 8 clients,
letting them sleep after every run cost 1-17% of the throughput). A request that no other request waits
behind runs on a second session of the same graph (reading the first one's weights, not a copy) whose
threads sleep as soon as the run returns, so that between requests the cores go to the HTTP server, the
next request's decoding and anything else on the machine (one client, 500 Census candidates: p99 9.24
against 9.54 ms over 5 rounds, 8.31 against 8.99 over 3; BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from mtrec import __version__
from mtrec.errors import MtrecError
from mtrec.files import write_json_atomic
from mtrec.serve import SpinMode
from mtrec.serve.encoding import RequestEncoder, RequestError, parse_body
from mtrec.serve.scorers import Scorer, build_scorer
from mtrec.threads import apply_thread_policy, prepare_openmp, thread_count

if TYPE_CHECKING:
    from mtrec.data.tables import FeatureLayout
    from mtrec.fusion.calibration import Calibrators
    from mtrec.fusion.spec import FusionSpec

log = logging.getLogger("mtrec.serve")
SETTINGS_ENV = "MTREC_SERVE_SETTINGS"  # the settings, as JSON, for worker processes
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
ENDPOINTS = ("/rank", "/health", "/model", "/metrics", "/reload")


class ServeSettings(BaseModel):
    """Everything a worker needs to build the service."""

    run: Path
    fusion: Path | None = None
    backend: Literal["torch", "onnx"] = "torch"
    threads: int = Field(1, ge=1)
    ort_spin: SpinMode = "auto"  # how the ONNX backend's threads wait (module docstring)
    max_candidates: int = Field(1000, ge=1)
    max_body_bytes: int = Field(8 << 20, ge=1)
    timeout_s: float = Field(1.0, gt=0)
    state_file: Path | None = None  # shared by the workers: the run to serve after a reload


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


@dataclass
class Ranker:
    """One loaded run, ready to rank: encoder, scorer, calibrators and fusion spec. Immutable once
    built; a reload builds a new one and swaps the reference."""

    run: Path
    encoder: RequestEncoder
    scorer: Scorer
    calibrators: Calibrators
    fusion: FusionSpec | None
    layout: FeatureLayout
    info: dict
    generation: int = 0
    names: list[str] = field(default_factory=list)

    def rank(self, body: bytes, alone: Callable[[], bool] | None = None) -> tuple[bytes, dict[str, float], int]:
        """The response body of a ``/rank`` request, its timings (ms) and its number of candidates;
        :class:`RequestError` if the request is bad. ``alone``: asked when the model is about to run, whether
        no other request waits (default: yes); the scorer may then free its threads once done."""
        from mtrec.fusion.spec import apply_fusion
        from mtrec.metrics.core import joint_scores

        t0 = time.perf_counter()
        parsed = self.encoder.parse(body)
        t1 = time.perf_counter()
        batch = self.encoder.encode(parsed)
        t2 = time.perf_counter()
        raw = self.scorer.score(batch, alone() if alone is not None else True)
        t3 = time.perf_counter()
        scores = self.calibrators.apply(raw)
        joint = joint_scores(scores, self.layout)
        fused = apply_fusion(scores, self.fusion) if self.fusion is not None else scores[:, 0].astype(np.float64)
        table = np.column_stack([scores, *joint.values()]) if joint else scores
        if not (np.isfinite(fused).all() and np.isfinite(table).all()):
            i = int(np.flatnonzero(~(np.isfinite(fused) & np.isfinite(table).all(axis=1)))[0])
            raise RequestError(
                422,
                f"candidates[{i}]",
                "the model's score is not finite; an input value is far outside the training range",
            )
        order = np.argsort(-fused, kind="stable")
        names = self.names
        ranking = [
            {"index": i, "score": s, "scores": dict(zip(names, row))}
            for i, s, row in zip(order.tolist(), fused[order].tolist(), table[order].astype(np.float64).tolist())
        ]
        payload = orjson.dumps({"ranking": ranking})
        t4 = time.perf_counter()
        ms = 1000.0
        timing = {"parse": (t1 - t0) * ms, "encode": (t2 - t1) * ms, "model": (t3 - t2) * ms, "total": (t4 - t0) * ms}
        return payload, timing, batch.size


def load_ranker(
    settings: ServeSettings, run: Path | None = None, fusion: Path | None = None, generation: int = 0
) -> Ranker:
    """Load ``run`` (default: the settings' run and fusion) for serving; :class:`MtrecError` if it cannot be."""
    from mtrec.fusion.calibration import Calibrators
    from mtrec.fusion.spec import fusion_for_run
    from mtrec.metrics.core import joint_scores
    from mtrec.train.run import WEIGHTS, load_run

    if run is None:
        run, fusion = settings.run, settings.fusion
    run = Path(run)
    loaded = load_run(run)
    layout = loaded.model.layout
    calibrators = Calibrators.load(run)
    spec = fusion_for_run(run, layout, calibrators.method, fusion)
    scorer = build_scorer(settings.backend, run, loaded.model, settings.threads, settings.ort_spin)
    encoder = RequestEncoder(loaded.schema, loaded.encoders, settings.max_candidates)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    weights = run / WEIGHTS
    joint = list(joint_scores(np.zeros((1, layout.num_tasks)), layout))
    info = {
        "model": loaded.model.model_name(),
        "run": str(run.resolve()),
        "backend": settings.backend,
        "tasks": [{"name": t.name, "type": t.type, "space": t.space} for t in layout.tasks],
        "scores": layout.task_names + joint,
        "fusion": spec.model_dump(mode="json", exclude={"search"}, exclude_none=True) if spec is not None else None,
        "ranked_by": "fusion" if spec is not None else layout.task_names[0],
        "calibration": calibrators.method,
        "version": {
            "mtrec": __version__,
            "trained_with": loaded.config.get("mtrec_version"),
            "weights_mtime": weights.stat().st_mtime_ns,
        },
        "trained_at": _iso(weights.stat().st_mtime),
        "test_metrics": metrics.get("test"),
        "columns": encoder.describe(),
        "max_candidates": settings.max_candidates,
    }
    return Ranker(run, encoder, scorer, calibrators, spec, layout, info, generation, layout.task_names + joint)


# ---- metrics ---------------------------------------------------------------------------------------


class Metrics:
    """Request counts by endpoint and status, latency and model-time histograms (prometheus_client;
    across worker processes when ``PROMETHEUS_MULTIPROC_DIR`` is set, as ``mtrec serve`` does for
    ``--workers`` > 1)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = None if self.multiprocess else CollectorRegistry()
        self.requests = Counter(
            "mtrec_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mtrec_request_seconds",
            "Request latency in the server (first byte in to last byte out)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model = Histogram(
            "mtrec_model_seconds",
            "Model forward time of /rank requests",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.candidates = Counter(
            "mtrec_candidates_ranked", "Candidates ranked (successful /rank requests)", registry=self.registry
        )

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if self.registry is not None:  # one process: its own registry
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP response by endpoint and status, times it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope.get("path", "") if scope.get("path", "") in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# ---- the service's state: the ranker in use, reloads -------------------------------------------------


def settle_garbage_collector(reload: bool = False) -> None:
    """Move every object alive now (the loaded libraries and the run: about 320,000 tracked objects with
    torch, ONNX Runtime and FastAPI) out of the collector's reach with ``gc.freeze()``. Without it, a full
    collection walks them all every so often (about 150 ms on Census ``mmoe``: one request in a thousand
    waited that long); requests allocate short-lived objects only, which the young generations collect.
    After a reload the frozen objects go back to the collector first (``gc.unfreeze()``), so that a
    replaced run caught in reference cycles is freed, at the cost of one full collection then."""
    if reload:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


class ServiceState:
    """The ranker in use (swapped atomically by a reload), the model thread and the reload watcher."""

    def __init__(self, settings: ServeSettings, ranker: Ranker | None = None) -> None:
        self.settings = settings
        apply_thread_policy(settings.threads)  # mtrec/threads.py; the OpenMP setting came with the environment
        self.ranker = ranker if ranker is not None else self._initial()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtrec-rank")
        self.pending = 0  # /rank requests handed to the model thread and not yet ranked (under _pending_lock)
        self._pending_lock = threading.Lock()
        self.reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._seen_state = self._state_mtime()
        self._watcher: threading.Thread | None = None

    # a reload is published in the state file: {"generation", "run", "fusion"}
    def _read_state(self) -> dict | None:
        path = self.settings.state_file
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text() or "null")
        except ValueError:
            return None

    def _state_mtime(self) -> int | None:
        path = self.settings.state_file
        try:
            return path.stat().st_mtime_ns if path is not None else None
        except OSError:
            return None

    def _initial(self) -> Ranker:
        state = self._read_state()
        if state:  # a worker restarted after a reload serves the reloaded run
            try:
                return load_ranker(
                    self.settings, Path(state["run"]), _opt_path(state.get("fusion")), int(state["generation"])
                )
            except (MtrecError, KeyError, TypeError, ValueError) as err:
                log.warning(
                    "state file %s: cannot load %s (%s); serving %s",
                    self.settings.state_file,
                    state,
                    err,
                    self.settings.run,
                )
        return load_ranker(self.settings)

    def reload(self, run: Path, fusion: Path | None) -> Ranker:
        """Load ``run`` and swap it in (and publish it to the other workers); raises MtrecError."""
        with self.reload_lock:
            generation = max(self.ranker.generation, (self._read_state() or {}).get("generation", 0)) + 1
            ranker = load_ranker(self.settings, run, fusion, generation)
            self.ranker = ranker  # one reference assignment: a request holds the ranker it started with
            settle_garbage_collector(reload=True)
            if self.settings.state_file is not None:
                self._publish({"generation": generation, "run": str(run), "fusion": str(fusion) if fusion else None})
            return ranker

    def reload_current(self) -> None:
        """Reload the run being served from its directory (SIGHUP); on failure keep serving and log why."""
        info = self.ranker
        fusion = self.settings.fusion if info.run == self.settings.run else None
        try:
            self.reload(info.run, fusion)
            log.warning("SIGHUP: reloaded %s (generation %d)", info.run, self.ranker.generation)
        except Exception as err:
            log.error(
                "SIGHUP: cannot reload %s (%s); still serving generation %d", info.run, err, self.ranker.generation
            )

    def _publish(self, state: dict) -> None:
        path = self.settings.state_file
        assert path is not None  # only multi-worker serving, which has a state file, publishes
        write_json_atomic(path, state)
        self._seen_state = self._state_mtime()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            mtime = self._state_mtime()
            if mtime is None or mtime == self._seen_state:
                continue
            self._seen_state = mtime
            state = self._read_state()
            if not state or int(state.get("generation", 0)) <= self.ranker.generation:
                continue
            with self.reload_lock:
                try:
                    self.ranker = load_ranker(
                        self.settings, Path(state["run"]), _opt_path(state.get("fusion")), int(state["generation"])
                    )
                    settle_garbage_collector(reload=True)
                except Exception as err:  # keep serving the current run
                    log.error("reload of %s published by another worker failed: %s", state.get("run"), err)

    def count_pending(self, change: int) -> None:
        with self._pending_lock:
            self.pending += change

    def submit(self, ranker: Ranker, body: bytes) -> Future:
        """Rank ``body`` on the model thread; until it is ranked it counts as pending (:meth:`alone`)."""

        def job() -> tuple[bytes, dict[str, float], int]:
            try:
                return ranker.rank(body, self.alone)
            finally:  # counted off here, not when the event loop gets the answer: the next job may start first
                self.count_pending(-1)

        self.count_pending(1)
        return self.executor.submit(job)

    def alone(self) -> bool:
        """Whether the request about to be scored is the only one handed to the model thread and not ranked."""
        return self.pending <= 1

    def start(self) -> None:
        settle_garbage_collector()
        if self.settings.state_file is not None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="mtrec-reload-watch", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _opt_path(value: Any) -> Path | None:
    return Path(value) if value else None


# ---- the app -------------------------------------------------------------------------------------


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body", f"{int(declared)} bytes, above the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body", f"more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: ServeSettings, ranker: Ranker | None = None) -> FastAPI:
    """The FastAPI app serving ``settings.run`` (or an already loaded ``ranker``)."""
    state = ServiceState(settings, ranker)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        loop = asyncio.get_running_loop()
        try:  # SIGHUP: load the serving run again from disk (e.g. retrained, or a new fusion.yaml) and swap it in
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, state.reload_current))
        except (NotImplementedError, RuntimeError, ValueError):  # no signals here (another thread, another OS)
            pass
        yield
        state.stop()

    app = FastAPI(title="mtrec ranking service", version=__version__, lifespan=lifespan)
    app.state.service = state

    @app.post("/rank")
    async def rank(request: Request) -> Response:
        """Rank the candidates of one request (see the module docstring for the body)."""
        try:
            body = await _read_body(request, settings.max_body_bytes)
            future = state.submit(state.ranker, body)
            try:
                payload, timing, size = await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
            except asyncio.TimeoutError:
                if future.cancel():  # it never started: it no longer waits
                    state.count_pending(-1)
                return JSONResponse(
                    {"detail": f"request: timed out after {settings.timeout_s * 1000:g} ms", "field": None},
                    status_code=503,
                )
        except RequestError as err:
            return _error(err)
        except ClientDisconnect:  # the client went away mid-body: nobody to answer, not a server fault
            return JSONResponse({"detail": "body: the client disconnected", "field": "body"}, status_code=400)
        except Exception:
            log.exception("internal error on /rank")
            return JSONResponse({"detail": "internal error", "field": None}, status_code=500)
        metrics.model.observe(timing["model"] / 1000.0)
        metrics.candidates.inc(size)
        server_timing = ", ".join(f"{k};dur={v:.3f}" for k, v in timing.items())
        return Response(payload, media_type="application/json", headers={"Server-Timing": server_timing})

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the run being served, its generation (incremented by each reload) and the answering
        worker's process id (with several workers, which one this connection reached)."""
        r = state.ranker
        return {
            "status": "ok",
            "run": r.info["run"],
            "model": r.info["model"],
            "generation": r.generation,
            "worker": os.getpid(),
        }

    @app.get("/model")
    async def model() -> dict:
        """What is served: model, tasks, fusion, calibration, versions, training time, test metrics, columns."""
        r = state.ranker
        return {**r.info, "generation": r.generation}

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reload")
    async def reload(request: Request) -> Response:
        """Load ``{"run": DIR, "fusion": FILE (optional; default the run's fusion.yaml)}`` and swap it in."""
        try:
            data = parse_body(await _read_body(request, settings.max_body_bytes))
            if not isinstance(data, dict):
                raise RequestError(422, "body", 'expected a JSON object {"run": DIR}')
            unknown = [k for k in data if k not in ("run", "fusion")]
            if unknown:
                raise RequestError(422, unknown[0], "unknown field; give 'run' and optionally 'fusion'")
            for key in ("run", "fusion"):
                if key in data and not (isinstance(data[key], str) or (key == "fusion" and data[key] is None)):
                    raise RequestError(422, key, "expected a path string")
            if "run" not in data:
                raise RequestError(422, "run", "missing; give the run directory to serve")
            try:
                ranker = await asyncio.to_thread(state.reload, Path(data["run"]), _opt_path(data.get("fusion")))
            except MtrecError as err:
                raise RequestError(422, "run", f"cannot serve it: {err}") from None
        except RequestError as err:
            return _error(err)
        return JSONResponse(
            {
                "status": "reloaded",
                "run": ranker.info["run"],
                "model": ranker.info["model"],
                "generation": ranker.generation,
            }
        )

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """App factory of the worker processes (``--workers`` > 1): the settings come in ``MTREC_SERVE_SETTINGS``."""
    return create_app(ServeSettings.model_validate_json(os.environ[SETTINGS_ENV]))


def default_threads(workers: int) -> int:
    """Torch threads per worker when not given: ``OMP_NUM_THREADS``, else the cores divided among the
    workers, at least 1 (:func:`mtrec.threads.thread_count`)."""
    return thread_count(None, workers=workers)


def serve(settings: ServeSettings, host: str, port: int, workers: int, log_level: str = "warning") -> None:
    """Load the run (failing early, as one error, when it cannot be served) and run uvicorn."""
    import socket
    import tempfile

    import uvicorn

    ranker = load_ranker(settings)  # also exports model.onnx once, before the workers start, for --backend onnx
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise MtrecError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    print(
        f"serving {ranker.info['run']} (model {ranker.info['model']}, backend {settings.backend}, ranked by "
        f"{ranker.info['ranked_by']}) on http://{host}:{port} with {workers} worker(s) x {settings.threads} thread(s)",
        flush=True,
    )
    common: dict[str, Any] = dict(
        host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5
    )
    if workers == 1:
        uvicorn.run(create_app(settings, ranker), **common)
        return
    with tempfile.TemporaryDirectory(prefix="mtrec-serve-") as tmp:
        settings = settings.model_copy(update={"state_file": Path(tmp) / "state.json"})
        prepare_openmp()  # the workers inherit the OpenMP wait setting before they import torch (mtrec/threads.py)
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(tmp) / "prometheus")
        (Path(tmp) / "prometheus").mkdir()
        uvicorn.run("mtrec.serve.service:app_from_env", factory=True, workers=workers, **common)
