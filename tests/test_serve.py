"""The ranking service: the real ``mtrec serve`` process on a free localhost port, on small real runs.

Checked against ``mtrec predict`` on the same rows (context columns copied into every row), the 4xx
matrix, fuzzed request bodies (hypothesis), a burst of good and bad requests from several threads,
the info endpoints, and a reload under load.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import torch
from conftest import write_census_slice
from helpers import write_toy
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mtrec.cli import app
from mtrec.data.ingest import encode_file, read_frame
from mtrec.data.store import load_store
from mtrec.errors import MtrecError
from mtrec.fusion.calibration import Calibrators
from mtrec.fusion.io import run_predictions
from mtrec.fusion.spec import FUSION_FILE, build_spec
from mtrec.schema import load_schema
from mtrec.serve.encoding import RequestEncoder, RequestError, parse_body, request_from_frame
from mtrec.train.run import load_run, predict_file, train_run
from mtrec.train.trainer import TrainConfig

CONTEXT = ["age", "sex", "race", "education", "citizenship"]  # the user side; "age" feeds a dense and a sparse feature
MAX_CANDIDATES = 64
MAX_BODY = 262144  # --max-body-mb 0.25
PROCESSES: dict[str, subprocess.Popen] = {}  # base URL -> the server process


def _train(schema_path: Path, model: str, out: Path) -> Path:
    train_run(
        load_schema(schema_path), model, out, TrainConfig(epochs=1, batch_size=512, progress=False), tensorboard=False
    )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two Census runs (mmoe with a Platt calibrator and a weighted-product fusion spec; ple plain)."""
    root = tmp_path_factory.mktemp("serve")
    cache = root / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("MTREC_CACHE", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        schema_path = write_census_slice(root / "census", train_rows=2500, test_rows=300)
        mmoe = _train(schema_path, "mmoe", root / "mmoe")
        ple = _train(schema_path, "ple", root / "ple")
        valid = run_predictions(mmoe, ("valid",), calibrated=False)["valid"]
        calibrators = Calibrators.fit("platt", valid.scores, valid.labels, valid.layout)
        calibrators.save(mmoe)
        spec = build_spec("weighted_product", valid.layout, calibrators.apply(valid.scores), calibration="platt")
        spec.with_weights([1.0, 0.5], biases=[0.05, 0.2]).save(mmoe / FUSION_FILE)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    schema = load_run(mmoe).schema
    frame = read_frame(root / "census" / "test.csv.gz", schema)
    return {"mmoe": mmoe, "ple": ple, "frame": frame, "schema": schema, "cache": cache, "root": root}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(runs: dict, *extra: str) -> tuple[str, subprocess.Popen]:
    """``mtrec serve`` on run mmoe as a real process (the limits of this module, ``extra`` options);
    returns its base URL, once it answers, and the process."""
    port = _free_port()
    env = {**os.environ, "MTREC_CACHE": str(runs["cache"])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtrec.cli",
            "serve",
            "--run",
            str(runs["mmoe"]),
            "--port",
            str(port),
            "--threads",
            "1",
            "--max-candidates",
            str(MAX_CANDIDATES),
            "--max-body-mb",
            str(MAX_BODY / (1 << 20)),
            "--timeout-ms",
            "30000",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)
    return url, proc


def _stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert proc.returncode in (0, -15), proc.stderr.read()


@pytest.fixture(scope="module")
def server(runs: dict):
    """``mtrec serve`` on run mmoe, as a real process; yields its base URL."""
    url, proc = _start_server(runs)
    PROCESSES[url] = proc
    yield url
    _stop_server(proc)


@pytest.fixture(scope="module")
def client(server: str):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def _rows(runs: dict, n: int) -> pl.DataFrame:
    """``n`` real test rows, one with an id never seen in training and one with a missing id."""
    frame = runs["frame"].head(n)
    return frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 2)
        .then(pl.lit("Astronaut"))
        .otherwise(pl.col("class_of_worker"))
        .alias("class_of_worker"),
        pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("major_industry")).alias("major_industry"),
    )


def _predict(run: Path, rows: pl.DataFrame, tmp: Path) -> pl.DataFrame:
    """``mtrec predict`` on ``rows`` with the context columns copied from the first row into every row."""
    rows = rows.with_columns([pl.lit(rows[c][0]).alias(c) for c in CONTEXT])
    rows.write_parquet(tmp / "rows.parquet")
    predict_file(run, tmp / "rows.parquet", tmp / "pred.parquet")
    return pl.read_parquet(tmp / "pred.parquet")


def _body(runs: dict, n: int) -> dict:
    return request_from_frame(_rows(runs, n), runs["schema"], CONTEXT)


def _check_against_predict(ranking: list[dict], pred: pl.DataFrame, score_column: str) -> None:
    assert sorted(e["index"] for e in ranking) == list(range(pred.height))
    expected = pred[score_column].to_numpy()
    fused = np.array([e["score"] for e in ranking])
    assert np.all(np.diff(fused) <= 0)  # best first
    np.testing.assert_allclose(fused, expected[[e["index"] for e in ranking]], atol=1e-5, rtol=0)
    # the order is predict's order up to ties within the tolerance
    assert np.all(np.diff(expected[[e["index"] for e in ranking]]) <= 1e-5)
    for task in ("income", "never_married"):
        got = np.array([e["scores"][task] for e in ranking])
        np.testing.assert_allclose(got, pred[task].to_numpy()[[e["index"] for e in ranking]], atol=1e-5, rtol=0)


def test_rank_equals_predict(runs: dict, client: httpx.Client, tmp_path: Path) -> None:
    rows = _rows(runs, 40)
    response = client.post("/rank", json=request_from_frame(rows, runs["schema"], CONTEXT))
    assert response.status_code == 200, response.text
    assert {"parse", "encode", "model", "total"} <= {
        p.split(";")[0] for p in response.headers["server-timing"].split(", ")
    }
    pred = _predict(runs["mmoe"], rows, tmp_path)
    assert "score" in pred.columns  # the run's fusion.yaml, applied on calibrated scores
    _check_against_predict(response.json()["ranking"], pred, "score")
    # the same candidates, every column per candidate (empty context): the same answer
    plain = request_from_frame(rows.with_columns([pl.lit(rows[c][0]).alias(c) for c in CONTEXT]), runs["schema"], [])
    again = client.post("/rank", json=plain).json()["ranking"]
    assert [e["index"] for e in again] == [e["index"] for e in response.json()["ranking"]]
    np.testing.assert_allclose([e["score"] for e in again], [e["score"] for e in response.json()["ranking"]], atol=1e-6)


def test_context_ids_in_any_form_encode_as_per_candidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A context id found as it is in the vocabulary is looked up directly; any other form (a float, the
    text of a float, an unknown id, null, "") goes the column path: either way the batch equals the one
    with the same value in every candidate, and unknown ids get the out-of-vocabulary id."""
    monkeypatch.setenv("MTREC_CACHE", str(tmp_path / "cache"))
    features = [  # the age column read as ids only (a dense feature would refuse text)
        {"name": "age_id", "type": "sparse", "column": "age", "embed_dim": 4},
        {"name": "city", "type": "sparse", "embed_dim": 4},
        {"name": "tags", "type": "sequence", "embed_dim": 4, "max_len": 3},
    ]
    schema = load_schema(write_toy(tmp_path / "toy", rows=120, extra={"features": features}))
    encoder = RequestEncoder(schema, load_store(schema).encoders, 100)
    base = request_from_frame(read_frame(tmp_path / "toy" / "toy.csv", schema).head(6), schema, ["age", "city"])
    age = int(base["context"]["age"])  # an id column reads as text; the id as a JSON number is the same id
    forms = {"age": [age, str(age), float(age), f"{age}.0", 1000, "1000"], "city": ["paris", "atlantis", None, "", 5]}
    ids = {}
    for column, values in forms.items():
        for value in values:
            context = {**base["context"], column: value}
            per_candidate = {"context": {}, "candidates": [{**c, **context} for c in base["candidates"]]}
            got = encoder.encode({"context": context, "candidates": base["candidates"]})
            want = encoder.encode(per_candidate)
            np.testing.assert_array_equal(got.sparse, want.sparse)
            np.testing.assert_array_equal(got.dense, want.dense)
            assert got.context == frozenset({"age_id", "city"}) and want.context == frozenset()
            ids[column, repr(value)] = int(got.sparse[0, 0 if column == "age" else 1])
    assert len({ids["age", repr(v)] for v in forms["age"][:4]}) == 1 and ids["age", repr(age)] > 1
    assert ids["age", "1000"] == ids["age", "'1000'"] == 1 and ids["city", "'atlantis'"] == ids["city", "5"] == 1
    assert ids["city", "None"] == ids["city", "''"] != ids["city", "'paris'"]


def test_candidates_in_any_key_order_encode_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates listing their columns in one order take the flatten-and-slice path, mixed orders the
    per-row path: the same batch either way, misses (unknown ids, an id as a float or as its text)
    included, and a missing column in a mixed-order request is still named."""
    monkeypatch.setenv("MTREC_CACHE", str(tmp_path / "cache"))
    schema = load_schema(write_toy(tmp_path / "toy", rows=120))
    encoder = RequestEncoder(schema, load_store(schema).encoders, 100)
    body = request_from_frame(read_frame(tmp_path / "toy" / "toy.csv", schema).head(8), schema, [])
    cands = body["candidates"]
    sparse_col = next(f.source_column for f in schema.features if f.type == "sparse")
    cands[1][sparse_col], cands[2][sparse_col] = "never-seen", None  # an OOV and a missing id
    uniform = encoder.encode({"context": {}, "candidates": cands})
    mixed = [dict(reversed(list(c.items()))) if i % 2 else c for i, c in enumerate(cands)]
    assert list(mixed[1]) != list(mixed[0])
    got = encoder.encode({"context": {}, "candidates": mixed})
    np.testing.assert_array_equal(got.sparse, uniform.sparse)
    np.testing.assert_array_equal(got.dense, uniform.dense)
    j = [f.source_column for f in schema.features_of("sparse")].index(sparse_col)
    assert uniform.sparse[1, j] == 1  # the out-of-vocabulary id
    broken = [dict(c) for c in mixed]
    del broken[3][sparse_col]
    broken[3]["not_a_column"] = 1
    with pytest.raises(RequestError) as err:
        encoder.encode({"context": {}, "candidates": broken})
    assert err.value.field == "candidates[3].not_a_column"


def test_encoder_matches_ingest_with_sequences(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Column-wise request encoding (context broadcast, a sequence as a JSON list, ids as numbers or
    text, unknown ids) equals the file encoding of the same rows."""
    monkeypatch.setenv("MTREC_CACHE", str(tmp_path / "cache"))
    schema = load_schema(write_toy(tmp_path / "toy", rows=120))
    store = load_store(schema)
    frame = read_frame(tmp_path / "toy" / "toy.csv", schema).head(12)
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 4).then(pl.lit("atlantis")).otherwise(pl.col("city")).alias("city")
    )
    body = request_from_frame(frame, schema, ["tags"])  # a sequence given once, in the context
    body["candidates"][5]["city"] = None
    body["candidates"][6]["age"] = float(body["candidates"][6]["age"])  # 30.0 and 30 are the same value
    encoded = RequestEncoder(schema, store.encoders, 100).encode(body)
    rows = frame.with_columns(
        pl.lit(frame["tags"][0]).alias("tags"),
        pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise(pl.col("city")).alias("city"),
    )
    rows.write_csv(tmp_path / "rows.csv")
    expected = encode_file(tmp_path / "rows.csv", schema, store.encoders, with_labels=False)
    np.testing.assert_array_equal(encoded.sparse, expected["sparse"])
    np.testing.assert_array_equal(encoded.dense, expected["dense"])
    assert encoded.sequences["tags"].shape == (1, 3) and encoded.context == frozenset({"tags"})
    np.testing.assert_array_equal(np.broadcast_to(encoded.sequences["tags"], (12, 3)), expected["seq.tags"])
    assert encoded.sparse[4, 0] == 1  # the unknown city: the out-of-vocabulary id
    # per candidate, with lists of ids, numbers among them, and one over max_len
    body = request_from_frame(frame, schema, [])
    body["candidates"][0]["tags"] = ["a", "b", "c", "d"]
    rows = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("a|b|c|d")).otherwise(pl.col("tags")).alias("tags")
    )
    rows.write_csv(tmp_path / "rows2.csv")
    expected = encode_file(tmp_path / "rows2.csv", schema, store.encoders, with_labels=False)
    np.testing.assert_array_equal(
        RequestEncoder(schema, store.encoders, 100).encode(body).sequences["tags"], expected["seq.tags"]
    )
    with pytest.raises(RequestError, match=r"candidates\[1\]\.tags\[0\]"):
        body["candidates"][1]["tags"] = [None]
        RequestEncoder(schema, store.encoders, 100).encode(body)


def _json_leaf(text_size: int, samples: list) -> st.SearchStrategy:
    """A JSON scalar a client might send: null, a boolean, an integer beyond 64 bits, any float (NaN and
    infinities included), short text, or one of ``samples`` (values that look like the data's)."""
    return (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats()
        | st.text(max_size=text_size)
        | st.sampled_from(samples)
    )


def _outcome(encoder: RequestEncoder, raw: bytes, typed: bool) -> tuple:
    """What encoding the bytes ``raw`` gives, read by ``encoder.parse`` (``typed``) or as plain JSON: the
    encoded arrays, or the error (status, field, reason)."""
    try:
        e = encoder.encode(encoder.parse(raw) if typed else parse_body(raw))
    except RequestError as err:
        return ("error", err.status, err.field, err.reason)
    sequences = {k: v.tolist() for k, v in e.sequences.items()}
    return ("ok", e.size, e.sparse.tolist(), e.dense.tolist(), sequences, e.context)


def test_typed_decoder_encodes_as_the_checked_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes of a request read by the typed (msgspec) decoder give the same batch, or the same error
    naming the same field, as the same bytes parsed as plain JSON and checked column by column; fuzzed
    values (wrong types, huge integers, NaN, lists, nulls), missing, moved and unknown columns. The typed
    decoder takes the good bodies (a column read as a number and as an id, a sequence, both sides)."""
    monkeypatch.setenv("MTREC_CACHE", str(tmp_path / "cache"))
    features = [
        {"name": "age", "type": "dense"},
        {"name": "age_id", "type": "sparse", "column": "age", "embed_dim": 4},
        {"name": "city", "type": "sparse", "embed_dim": 4},
        {"name": "tags", "type": "sequence", "embed_dim": 4, "max_len": 3},
    ]
    schema = load_schema(write_toy(tmp_path / "toy", rows=120, extra={"features": features}))
    encoder = RequestEncoder(schema, load_store(schema).encoders, 6)
    frame = read_frame(tmp_path / "toy" / "toy.csv", schema).head(5)
    bases = [request_from_frame(frame, schema, context) for context in ([], ["city"], ["age", "tags"])]
    columns = ["age", "city", "tags", "nope"]
    leaf = _json_leaf(4, ["paris", "617.0", "", "a", 41, 41.0, "41"])
    value = leaf | st.lists(leaf, max_size=4)
    typed = []

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data) -> None:
        body = copy.deepcopy(data.draw(st.sampled_from(bases)))
        for _ in range(data.draw(st.integers(0, 3))):
            column = data.draw(st.sampled_from(columns))
            where = data.draw(st.sampled_from(["context", *range(len(body["candidates"]))]))
            target = body["context"] if where == "context" else body["candidates"][where]
            if data.draw(st.booleans()):
                target[column] = data.draw(value)
            else:
                target.pop(column, None)
        if data.draw(st.integers(0, 9)) == 0:
            body["candidates"] = body["candidates"][:1] * data.draw(st.sampled_from([0, 7]))
        raw = json.dumps(body).encode()
        typed.append(not isinstance(encoder.parse(raw), dict))
        assert _outcome(encoder, raw, typed=True) == _outcome(encoder, raw, typed=False), raw

    check()
    assert 20 < sum(typed) < len(typed) - 20, sum(typed)  # both paths were exercised
    for base in bases:  # a good body is read by the typed decoder
        raw = json.dumps(base).encode()
        assert not isinstance(encoder.parse(raw), dict) and _outcome(encoder, raw, typed=True)[0] == "ok"


def _bad_cases(base: dict) -> list[tuple[str, bytes, int, str]]:
    """(name, body, status, field the reason must name)."""
    cases = []

    def variant(name: str, status: int, field: str, change) -> None:
        body = copy.deepcopy(base)
        change(body)
        cases.append((name, json.dumps(body).encode(), status, field))

    cases.append(("malformed JSON", b'{"context": {"age": 3', 400, "body"))
    cases.append(("not JSON at all", b"\xff\xfe garbage", 400, "body"))
    marked = copy.deepcopy(base)
    marked["candidates"][1]["capital_gains"] = 987654321
    for name, literal in (("NaN", "NaN"), ("Infinity", "-Infinity")):
        cases.append(
            (name, json.dumps(marked).replace("987654321", literal).encode(), 422, "candidates[1].capital_gains")
        )
    cases.append(("not an object", b"[1, 2]", 422, "body"))
    variant("unknown top-level field", 422, "contxt", lambda b: b.update(contxt={}))
    variant("context not an object", 422, "context", lambda b: b.update(context=[1]))
    variant("no candidates", 422, "candidates", lambda b: b.pop("candidates"))
    variant("empty candidates", 422, "candidates", lambda b: b.update(candidates=[]))
    variant(
        "too many candidates",
        422,
        "candidates",
        lambda b: b.update(candidates=b["candidates"][:1] * (MAX_CANDIDATES + 1)),
    )
    variant("candidate not an object", 422, "candidates[1]", lambda b: b["candidates"].__setitem__(1, "x"))
    variant("missing feature column", 422, "candidates[0].education", lambda b: b["context"].pop("education"))
    variant(
        "missing in one candidate", 422, "candidates[3].weeks_worked", lambda b: b["candidates"][3].pop("weeks_worked")
    )
    variant("column on both sides", 422, "candidates[0].sex", lambda b: b["candidates"][0].update(sex="Male"))
    variant("unknown column", 422, "context.nope", lambda b: b["context"].update(nope=1))
    variant("unknown candidate column", 422, "candidates[1].nope", lambda b: b["candidates"][1].update(nope=1))
    variant(
        "dense as a string", 422, "candidates[1].wage_per_hour", lambda b: b["candidates"][1].update(wage_per_hour="12")
    )
    variant(
        "dense as a boolean",
        422,
        "candidates[2].capital_losses",
        lambda b: b["candidates"][2].update(capital_losses=True),
    )
    variant(
        "dense missing, no fill",
        422,
        "candidates[4].weeks_worked",
        lambda b: b["candidates"][4].update(weeks_worked=None),
    )
    variant("dense too large", 422, "context.age", lambda b: b["context"].update(age=10**400))
    variant(
        "id as a list", 422, "candidates[0].class_of_worker", lambda b: b["candidates"][0].update(class_of_worker=["a"])
    )
    variant("id as an object", 422, "context.race", lambda b: b["context"].update(race={"a": 1}))
    variant("id as a boolean", 422, "context.sex", lambda b: b["context"].update(sex=False))
    variant(
        "dense out of range",
        422,
        "candidates[0].num_persons_worked",
        lambda b: b["candidates"][0].update(num_persons_worked=1e308),
    )
    big = copy.deepcopy(base)
    big["candidates"][0]["class_of_worker"] = "x" * (MAX_BODY + 10)
    cases.append(("body above the size limit", json.dumps(big).encode(), 413, "body"))
    return cases


def test_bad_requests_get_4xx_naming_the_field(runs: dict, client: httpx.Client) -> None:
    base = _body(runs, 6)
    for name, body, status, field in _bad_cases(base):
        response = client.post("/rank", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, (name, response.status_code, response.text)
        detail = response.json()
        assert detail["field"] == field and detail["detail"].startswith(field + ":"), (name, detail)
    # a chunked upload (no Content-Length) above the limit is cut off too
    chunks = iter([b'{"candidates": ["' + b"x" * 65536] * 5 + [b'"]}'])
    assert client.post("/rank", content=chunks).status_code == 413
    assert client.post("/rank", json=base).status_code == 200  # and the service still serves


def test_fuzzed_bodies_never_get_5xx(runs: dict, client: httpx.Client) -> None:
    base = _body(runs, 3)
    columns = list(base["context"]) + list(base["candidates"][0]) + ["nope", ""]
    leaf = _json_leaf(6, ["Male", "?", "617.0", "Not in universe", "NaN"])
    value = st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=6,
    )

    @st.composite
    def bodies(draw) -> bytes:
        if draw(st.integers(0, 4)) == 0:
            return json.dumps(draw(value)).encode()
        body = copy.deepcopy(base)
        for _ in range(draw(st.integers(1, 3))):
            where = draw(st.sampled_from(["context", *range(len(body["candidates"]))]))
            target = body["context"] if where == "context" else body["candidates"][where]
            if not isinstance(target, dict):
                continue
            column = draw(st.sampled_from(columns))
            op = draw(st.sampled_from(["set", "set", "delete", "shuffle"]))
            if op == "set":
                target[column] = draw(value)
            elif op == "delete":
                target.pop(column, None)
            else:  # (an earlier shuffle may have left no candidate to sample from)
                pool = st.sampled_from(body["candidates"]) | value if body["candidates"] else value
                body["candidates"] = draw(st.lists(pool, max_size=4))
        raw = json.dumps(body).encode()
        if draw(st.integers(0, 9)) == 0:
            raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
        return raw

    seen: dict[int, int] = {}

    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(raw=bodies())
    @example(raw=json.dumps(base).encode())  # the unmodified body: the run always holds one good answer
    def fuzz(raw: bytes) -> None:
        response = client.post("/rank", content=raw, headers={"content-type": "application/json"})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400, 422), (raw[:300], response.status_code, response.text)
        data = response.json()
        if response.status_code == 200:
            assert all(np.isfinite(e["score"]) for e in data["ranking"])
        else:
            assert data["detail"].startswith(data["field"] + ":")

    fuzz()
    assert seen.get(200, 0) > 0 and seen.get(422, 0) > 0  # the fuzzing reached both sides


def test_burst_of_good_and_bad_requests(runs: dict, client: httpx.Client, server: str) -> None:
    goods = [_body(runs, n) for n in (8, 20)]
    refs = [client.post("/rank", json=g).json() for g in goods]
    bads = [body for _, body, status, _ in _bad_cases(goods[0]) if status != 413]
    results: list[tuple[str, int, object]] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(base_url=server, timeout=60) as c:
            for i in range(10):
                if (i + k) % 2:
                    r = c.post("/rank", json=goods[(i + k) % 4 // 2])
                    out = ("good", r.status_code, (r.json(), refs[(i + k) % 4 // 2]))
                else:
                    r = c.post("/rank", content=bads[(i * 7 + k) % len(bads)])
                    out = ("bad", r.status_code, None)
                with lock:
                    results.append(out)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 80
    good = [(s, pair) for kind, s, pair in results if kind == "good"]
    assert len(good) == 40 and all(s == 200 and pair[0] == pair[1] for s, pair in good)
    assert all(400 <= s < 500 for kind, s, _ in results if kind == "bad")


def test_health_model_and_metrics(runs: dict, client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "mmoe"
    info = client.get("/model").json()
    metrics = json.loads((runs["mmoe"] / "metrics.json").read_text())
    assert info["model"] == "mmoe" and [t["name"] for t in info["tasks"]] == ["income", "never_married"]
    assert info["test_metrics"] == metrics["test"] and info["calibration"] == "platt"
    assert info["fusion"]["formula"] == "weighted_product" and [t["weight"] for t in info["fusion"]["tasks"]] == [
        1.0,
        0.5,
    ]
    trained = datetime.fromisoformat(info["trained_at"]).timestamp()
    assert info["version"]["mtrec"] and abs(trained - (runs["mmoe"] / "model.safetensors").stat().st_mtime) < 1
    assert info["columns"]["age"] == [{"feature": "age", "type": "dense"}, {"feature": "age_bucket", "type": "sparse"}]

    def counts() -> dict:
        out = {}
        for line in client.get("/metrics").text.splitlines():
            for key in (
                'mtrec_requests_total{endpoint="/rank",status="200"}',
                'mtrec_requests_total{endpoint="/rank",status="422"}',
                'mtrec_request_seconds_count{endpoint="/rank"}',
                "mtrec_candidates_ranked_total",
            ):
                if line.startswith(key + " "):
                    out[key] = float(line.split()[-1])
        return out

    before = counts()
    body = _body(runs, 5)
    for _ in range(3):
        assert client.post("/rank", json=body).status_code == 200
    assert client.post("/rank", json={"candidates": []}).status_code == 422
    after = counts()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta['mtrec_requests_total{endpoint="/rank",status="200"}'] == 3
    assert delta['mtrec_requests_total{endpoint="/rank",status="422"}'] == 1
    assert delta['mtrec_request_seconds_count{endpoint="/rank"}'] == 4
    assert delta["mtrec_candidates_ranked_total"] == 15
    assert 'mtrec_request_seconds_bucket{endpoint="/rank",le="0.01"}' in client.get("/metrics").text


def test_reload_under_load(runs: dict, client: httpx.Client, server: str, tmp_path: Path) -> None:
    rows = _rows(runs, 12)
    body = request_from_frame(rows, runs["schema"], CONTEXT)
    before = client.post("/rank", json=body).json()
    generation = client.get("/health").json()["generation"]
    bad = client.post("/reload", json={"run": str(tmp_path / "missing")})
    assert bad.status_code == 422 and bad.json()["field"] == "run" and "not found" in bad.json()["detail"]
    assert client.post("/reload", json={"run": str(runs["ple"]), "extra": 1}).status_code == 422
    answers: list[tuple[int, object]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=server, timeout=60) as c:
            while not stop.is_set() and len(answers) < 400:
                r = c.post("/rank", json=body)
                answers.append((r.status_code, r.json()))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    reloaded = client.post("/reload", json={"run": str(runs["ple"])})
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["model"] == "ple" and reloaded.json()["generation"] == generation + 1
    after = client.post("/rank", json=body).json()
    assert client.get("/model").json()["model"] == "ple" and client.get("/model").json()["fusion"] is None
    # every request in flight was answered, by one run or the other, never a mix or an error
    assert answers and all(status == 200 for status, _ in answers)
    assert all(a == before or a == after for _, a in answers)
    assert after != before
    # ple has no fusion.yaml: ranked by its first task, equal to predict
    _check_against_predict(after["ranking"], _predict(runs["ple"], rows, tmp_path), "income")
    assert client.post("/reload", json={"run": str(runs["mmoe"])}).json()["generation"] == generation + 2
    assert client.post("/rank", json=body).json() == before
    # SIGHUP: the serving run read again from disk, swapped in; the process lives on
    PROCESSES[server].send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while client.get("/health").json()["generation"] != generation + 3:
        assert time.monotonic() < deadline and PROCESSES[server].poll() is None
        time.sleep(0.1)
    assert client.post("/rank", json=body).json() == before


def test_two_workers_serve_reload_and_count_together(runs: dict, tmp_path: Path) -> None:
    """``--workers 2``: keep-alive clients connecting at once, once both workers are up, are spread over
    both worker processes and get the same ranking; a reload sent to one worker is taken up by the other
    (through the shared state file); ``/metrics`` adds up both workers' counts; SIGTERM to the supervisor
    stops it and its workers."""
    url, proc = _start_server(runs, "--workers", "2")
    try:
        deadline = time.monotonic() + 90
        while len({httpx.get(url + "/health", timeout=10).json()["worker"] for _ in range(8)}) < 2:
            assert time.monotonic() < deadline, "the second worker did not come up"
        reached: list[int] = []

        def connect() -> None:  # a client that keeps its connection: every request goes to one worker
            with httpx.Client(base_url=url, timeout=30) as c:
                reached.append(c.get("/health").json()["worker"])

        clients = [threading.Thread(target=connect) for _ in range(16)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=60)
        workers = set(reached)
        assert len(reached) == 16 and len(workers) == 2, reached  # not every connection on one worker

        def serving() -> dict[int, tuple[str, int]]:
            """Worker -> (model, generation), from new connections until both workers answered."""
            seen: dict[int, tuple[str, int]] = {}
            while len(seen) < 2:
                health = httpx.get(url + "/health", timeout=10).json()
                seen[health["worker"]] = (health["model"], health["generation"])
            return seen

        def wait_for(model: str, generation: int) -> None:
            deadline = time.monotonic() + 30
            while set(serving().values()) != {(model, generation)}:  # the other worker polls the state file
                assert time.monotonic() < deadline, f"not every worker took up the reload: {serving()}"
                time.sleep(0.05)

        body = _body(runs, 8)
        before = {json.dumps(httpx.post(url + "/rank", json=body, timeout=60).json()) for _ in range(6)}
        assert len(before) == 1
        generation = httpx.get(url + "/health").json()["generation"]
        reloaded = httpx.post(url + "/reload", json={"run": str(runs["ple"])}, timeout=60)
        assert reloaded.status_code == 200 and reloaded.json()["generation"] == generation + 1, reloaded.text
        wait_for("ple", generation + 1)
        after = {json.dumps(httpx.post(url + "/rank", json=body, timeout=60).json()) for _ in range(6)}
        assert len(after) == 1 and after != before
        metrics = httpx.get(url + "/metrics", timeout=10).text
        ranked = [line for line in metrics.splitlines() if line.startswith("mtrec_candidates_ranked_total")]
        assert ranked and float(ranked[0].split()[-1]) == 12 * 8, ranked  # 12 requests of 8, over both workers
    finally:
        _stop_server(proc)
    for pid in workers:  # the workers went with the supervisor
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_serve_option_errors(runs: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (["--run", str(tmp_path / "missing")], "run directory not found"),
        (["--run", str(runs["mmoe"]), "--backend", "tensorrt"], "--backend"),
        (["--run", str(runs["mmoe"]), "--workers", "0"], "--workers"),
        (["--run", str(runs["mmoe"]), "--port", "70000"], "--port"),
        (["--run", str(runs["mmoe"]), "--fusion", str(tmp_path / "none.yaml")], "fusion spec not found"),
        (["--run", str(runs["mmoe"]), "--ort-spin", "off"], "--ort-spin: only for --backend onnx"),
        (["--run", str(runs["mmoe"]), "--backend", "onnx", "--ort-spin", "never"], "'never' is not one of auto"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["serve", *args])
        assert isinstance(result.exception, MtrecError) and message in str(result.exception), (args, result.output)


def test_onnx_backend_ranks_as_torch(runs: dict, one_thread) -> None:
    """The ONNX Runtime scorer (the run's graph exported on first use) gives the torch ranking."""
    from mtrec.serve.service import ServeSettings, load_ranker

    body = json.dumps(_body(runs, 30)).encode()
    answers = {}
    for backend in ("torch", "onnx"):
        ranker = load_ranker(ServeSettings(run=runs["mmoe"], backend=backend, threads=1))
        assert type(ranker.scorer).__name__ == ("TorchScorer" if backend == "torch" else "OnnxRuntimeScorer")
        answers[backend] = json.loads(ranker.rank(body)[0])["ranking"]
    assert (runs["mmoe"] / "model.onnx").is_file()
    torch_scores = {e["index"]: e["score"] for e in answers["torch"]}
    np.testing.assert_allclose(
        [e["score"] for e in answers["onnx"]], [torch_scores[e["index"]] for e in answers["onnx"]], atol=1e-5
    )
    assert np.all(np.diff([e["score"] for e in answers["onnx"]]) <= 0)

    # --ort-spin reaches ONNX Runtime's sessions; the same ranking in every mode. auto (the default): one session
    # left spinning as ONNX Runtime does, one whose threads sleep once a run returns, chosen per request
    def entries(session) -> tuple[str | None, str | None]:
        options = session.get_session_options()
        out = []
        for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
            try:
                out.append(options.get_session_config_entry(key))
            except RuntimeError:  # not set
                out.append(None)
        return out[0], out[1]

    graph = ranker.scorer.batch_graph
    assert entries(graph.session) == (None, None) and entries(graph.alone_session) == (None, "1")
    for mode, want in (("on", (None, None)), ("off", ("0", None))):
        other = load_ranker(ServeSettings(run=runs["mmoe"], backend="onnx", threads=1, ort_spin=mode))
        assert entries(other.scorer.batch_graph.session) == want and other.scorer.batch_graph.alone_session is None
        assert json.loads(other.rank(body)[0])["ranking"] == answers["onnx"]
    before = _onnx_runs(ranker.scorer)
    queued = json.loads(ranker.rank(body, alone=lambda: False)[0])["ranking"]
    assert queued == answers["onnx"]
    assert _onnx_runs(ranker.scorer) == {"alone": before["alone"], "queued": before["queued"] + 1}

    # both sessions read one copy of the weights: changed in place, both score with the change, the same way
    for g in (ranker.scorer.batch_graph, ranker.scorer.context_graph):
        if g is not None:
            assert g.shared_weights
            for array in g.shared_weights.values():
                array *= 0.5
    changed = {alone: json.loads(ranker.rank(body, alone=lambda a=alone: a)[0])["ranking"] for alone in (True, False)}
    assert changed[True] == changed[False] != answers["onnx"]


def _onnx_runs(scorer) -> dict[str, int]:
    """Runs of an ONNX scorer's graphs on the session for a request alone / with others queued."""
    graphs = [g for g in (scorer.batch_graph, scorer.context_graph) if g is not None]
    return {k: sum(g.runs[k] for g in graphs) for k in ("alone", "queued")}


def test_requests_queued_together_keep_onnx_threads_spinning(runs: dict, one_thread) -> None:
    """`--ort-spin auto`: requests sent one at a time each run alone (on the sessions whose threads then sleep);
    requests waiting together run on the spinning session, all but the last, which is alone by then."""
    import asyncio
    import threading

    from mtrec.serve.service import ServeSettings, create_app

    body = json.dumps(_body(runs, 50)).encode()
    app = create_app(ServeSettings(run=runs["mmoe"], backend="onnx", threads=1, timeout_s=60))
    state = app.state.service

    async def main() -> dict[str, dict[str, int]]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for _ in range(3):
                assert (await c.post("/rank", content=body)).status_code == 200
            sequential = _onnx_runs(state.ranker.scorer)
            gate = threading.Event()  # holds the model thread until all 6 requests wait for it
            state.executor.submit(gate.wait, 60)
            sent = [asyncio.create_task(c.post("/rank", content=body)) for _ in range(6)]
            for _ in range(3000):
                if state.pending == 6:
                    break
                await asyncio.sleep(0.01)
            gate.set()
            answers = await asyncio.gather(*sent)
            assert [r.status_code for r in answers] == [200] * 6
            assert state.pending == 0
            now = _onnx_runs(state.ranker.scorer)
            return {"sequential": sequential, "together": {k: now[k] - sequential[k] for k in now}}

    seen = asyncio.run(main())
    assert seen == {"sequential": {"alone": 3, "queued": 0}, "together": {"alone": 1, "queued": 5}}, seen


def test_onnx_context_graph_ranks_as_torch(runs: dict, one_thread) -> None:
    """With RUN/model.context.onnx (`mtrec export --context-features`), the ONNX scorer feeds the request's
    context once (batch-1 inputs) when it gives every context feature of the graph, the full-batch graph
    otherwise; both rank as torch does (calibrated by the service, fused, never twice)."""
    from mtrec.serve.export import CONTEXT_ONNX_FILE, ONNX_FILE
    from mtrec.serve.service import ServeSettings, load_ranker

    run = runs["mmoe"]
    features = [f.name for f in runs["schema"].features if f.source_column in CONTEXT]
    assert len(features) == len(CONTEXT) + 1  # age feeds two features
    result = CliRunner().invoke(
        app, ["export", "--run", str(run), "--context-features", ",".join(features), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    try:
        rows = _rows(runs, 30)
        bodies = {
            "context": request_from_frame(rows, runs["schema"], CONTEXT),
            "partial": request_from_frame(
                rows.with_columns([pl.lit(rows[c][0]).alias(c) for c in CONTEXT]), runs["schema"], CONTEXT[:2]
            ),
        }
        torch_ranker = load_ranker(ServeSettings(run=run, backend="torch", threads=1))
        onnx_ranker = load_ranker(ServeSettings(run=run, backend="onnx", threads=1))
        scorer = onnx_ranker.scorer
        assert scorer.context_graph is not None and scorer.context_graph.path == run / CONTEXT_ONNX_FILE
        assert scorer.context_graph.context_features == set(features) and scorer.batch_graph.path == run / ONNX_FILE
        assert scorer.context_graph.calibration["method"] == "platt"  # included: the scorer reads raw.<task>
        for kind, body in bodies.items():
            batch = onnx_ranker.encoder.encode(body)
            graph = scorer.graph_for(batch)
            assert graph is (scorer.context_graph if kind == "context" else scorer.batch_graph), kind
            feed = graph.feed(batch.sparse, batch.dense, batch.sequences)
            assert all(feed[i.name].shape[0] == (1 if i.context else 30) for i in graph.inputs)
            raw = json.dumps(body).encode()
            want = json.loads(torch_ranker.rank(raw)[0])["ranking"]
            got = json.loads(onnx_ranker.rank(raw)[0])["ranking"]
            by_index = {e["index"]: e for e in want}
            np.testing.assert_allclose(
                [e["score"] for e in got], [by_index[e["index"]]["score"] for e in got], atol=1e-5, rtol=0
            )
            for task in ("income", "never_married"):
                np.testing.assert_allclose(
                    [e["scores"][task] for e in got], [by_index[e["index"]]["scores"][task] for e in got], atol=1e-5
                )
            assert np.all(np.diff([e["score"] for e in got]) <= 0)
            want_scores = np.array([e["score"] for e in want])
            assert [e["index"] for e in got] == [e["index"] for e in want] or np.min(
                np.abs(np.diff(want_scores))
            ) < 1e-5
    finally:
        (run / CONTEXT_ONNX_FILE).unlink(missing_ok=True)


def test_request_timeout_gets_503_and_the_service_goes_on(runs: dict, one_thread) -> None:
    """A request past the timeout gets a 503 naming the timeout; the next one is served. (In process,
    through httpx's ASGI transport: the real app, only the transport differs.)"""
    import asyncio

    from mtrec.serve.service import ServeSettings, create_app

    body = _body(runs, 40)

    async def post(timeout_s: float) -> list[httpx.Response]:
        app = create_app(ServeSettings(run=runs["mmoe"], threads=1, timeout_s=timeout_s))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as c:
            return [await c.post("/rank", json=body), await c.get("/health")]

    late, health = asyncio.run(post(1e-6))
    assert late.status_code == 503 and "timed out" in late.json()["detail"] and health.status_code == 200
    assert asyncio.run(post(30.0))[0].status_code == 200


def test_garbage_collector_settled_at_start_and_reload() -> None:
    """At start the loaded objects are frozen (a full collection no longer walks them; it took ~150 ms
    per pass in a served process); a reload unfreezes first, so a replaced run caught in a reference
    cycle is freed then, not kept forever."""
    import gc
    import weakref

    from mtrec.serve.service import settle_garbage_collector

    class Node:
        pass

    try:
        old = Node()
        old.self = old  # a reference cycle: only the collector frees it
        alive = weakref.ref(old)
        settle_garbage_collector()
        assert gc.get_freeze_count() > 0
        del old
        gc.collect()
        assert alive() is not None  # frozen: out of the collector's reach
        settle_garbage_collector(reload=True)
        assert alive() is None  # the reload's unfreeze let the full collection free it
        assert gc.get_freeze_count() > 0  # and what is alive now is frozen again
    finally:
        gc.unfreeze()
