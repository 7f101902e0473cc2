"""`m3ae serve`: request parsing and limits alone, then the real command on an embedded Ray.

The server tests run `m3ae serve` as a user does (a subprocess with its own local Ray and Serve,
HTTP on 127.0.0.1, a bearer token) and speak HTTP to it: its vectors equal `m3ae embed`'s for the
same files, concurrent requests share forwards, every limit answers its 4xx without harming the
replica, and SIGTERM stops it with every process it started.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m3ae.serve.inputs import Limits, RequestError, parse_form, parse_json

LIMITS = Limits(max_body_bytes=10_000, max_items=4, max_pixels=100, max_text_chars=20)


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def refused(status: int, match: str, fn, *args, **kw) -> None:
    with pytest.raises(RequestError, match=match) as e:
        fn(*args, **kw)
    assert e.value.status == status, e.value.message


# --------------------------------------------------------------------------- inputs alone
def test_json_bodies_of_each_kind():
    body = json.dumps({"images": [b64(b"abc"), "data:image/png;base64," + b64(b"xy")]})
    got = parse_json(body.encode(), "image", LIMITS)
    assert got.images == [b"abc", b"xy"] and got.names == ["images[0]", "images[1]"]
    got = parse_json(b'{"texts": ["  a cat ", "dog"], "encoding_format": "base64"}', "text", LIMITS)
    assert got.texts == ["a cat", "dog"] and got.encoding == "base64" and len(got) == 2
    got = parse_json(json.dumps({"images": [b64(b"i")], "texts": ["t"]}).encode(), "joint", LIMITS)
    assert got.images == [b"i"] and got.texts == ["t"]


def test_json_mistakes_name_the_field():
    refused(400, "not JSON", parse_json, b"{", "text", LIMITS)
    refused(400, "JSON object", parse_json, b"[1]", "text", LIMITS)
    refused(400, r"unknown field\(s\) \['images'\]", parse_json, b'{"images": []}', "text", LIMITS)
    refused(400, "must be a list", parse_json, b'{"texts": "a"}', "text", LIMITS)
    refused(400, "no items", parse_json, b'{"texts": []}', "text", LIMITS)
    refused(
        400, r"texts\[1\]: expected a string", parse_json, b'{"texts": ["a", 3]}', "text", LIMITS
    )
    refused(400, r"texts\[0\]: empty caption", parse_json, b'{"texts": ["  "]}', "text", LIMITS)
    refused(
        400, r"images\[0\]: not valid base64", parse_json, b'{"images": ["%%"]}', "image", LIMITS
    )
    refused(400, "exactly one of", parse_json, b'{"texts": ["a"]}', "joint", LIMITS)
    body = json.dumps({"images": [b64(b"a")] * 2, "texts": ["a"]}).encode()
    refused(400, "2 vs 1", parse_json, body, "joint", LIMITS)
    refused(400, "encoding_format", parse_json, b'{"texts": ["a"], "encoding_format": "hex"}',
            "text", LIMITS)  # fmt: skip


def test_limits_answer_413():
    refused(413, "exceeds the limit of 10,000", parse_json, b" " * 10_001, "text", LIMITS)
    refused(413, "5 items exceed the limit of 4", parse_json, b'{"texts": ["a","b","c","d","e"]}',
            "text", LIMITS)  # fmt: skip
    refused(413, r"texts\[0\]: 21 characters", parse_json, b'{"texts": ["' + b"x" * 21 + b'"]}',
            "text", LIMITS)  # fmt: skip
    with pytest.raises(ValueError, match=r"max_items \(--max-items\) must be a positive integer"):
        Limits(max_items=0)


def test_image_paths_only_under_the_allowed_folder(tmp_path):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"pixels")
    (tmp_path / "secret.png").write_bytes(b"secret")
    body = b'{"image_paths": ["sub/a.png"]}'
    assert parse_json(body, "image", LIMITS, str(root)).images == [b"pixels"]
    refused(403, "disabled", parse_json, body, "image", LIMITS, None)
    for escape in ("../secret.png", str(tmp_path / "secret.png")):
        body = json.dumps({"image_paths": [escape]}).encode()
        refused(403, "outside the allowed folder", parse_json, body, "image", LIMITS, str(root))
    refused(404, "no file", parse_json, b'{"image_paths": ["b.png"]}', "image", LIMITS, str(root))


def test_multipart_fields():
    fields = [("image", ("a.png", b"1")), ("text", " a cat "), ("image", ("", b"2")), ("text", "b")]
    got = parse_form(fields, "joint", LIMITS)
    assert got.images == [b"1", b"2"] and got.texts == ["a cat", "b"]
    assert got.names == ["image[0] (a.png)", "image[1]"]
    refused(400, "file upload", parse_form, [("image", "not a file")], "image", LIMITS)
    refused(400, r"unknown form field\(s\) \['text'\]", parse_form, fields, "image", LIMITS)
    refused(400, "1 vs 2", parse_form, fields[:1] + fields[3:] + fields[1:2], "joint", LIMITS)
    refused(413, "5 items", parse_form, [("text", "a")] * 5, "text", LIMITS)


# --------------------------------------------------------------------------- the server
TOKEN = "test-token-3f9a"
BATCH = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Eight images of several shapes, each with a caption beside it."""
    root = tmp_path_factory.mktemp("serve") / "files"
    root.mkdir()
    for i, (w, h) in enumerate([(40, 40), (64, 48), (30, 90), (100, 60)] * 2):
        (root / f"img{i}.png").write_bytes(png(w, h, i))
        (root / f"img{i}.txt").write_text(f"a drawing number {i} of a {['cat', 'dog'][i % 2]}")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import jax

    from m3ae.model import M3AE, model_config
    from m3ae.pretrained import save_pretrained

    cfg = model_config("tiny")
    x = dict(image=jax.numpy.zeros((1, 32, 32, 3)), text=jax.numpy.zeros((1, 16), int))
    params = M3AE(**cfg).init(jax.random.PRNGKey(1), **x, method=M3AE.encode)["params"]
    path = tmp_path_factory.mktemp("model") / "tiny"
    return save_pretrained(path, params, cfg, step=7, image_size=32, text_length=16)


def session_processes(sid: int) -> list:
    import psutil

    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                procs.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return procs


@pytest.fixture(scope="module")
def server(model_dir, files, tmp_path_factory):
    """`m3ae serve` in its own session; yields (base URL, process, log path)."""
    from m3ae.launch.local_cluster import free_port

    port, log = free_port(), tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [sys.executable, "-m", "m3ae.cli", "serve", "--model", str(model_dir)]
    cmd += ["--port", str(port), "--max-batch-size", str(BATCH), "--batch-wait-ms", "50"]
    cmd += ["--allow-files", str(files), "--max-body-mb", "0.5", "--max-pixels", "20000"]
    cmd += ["--max-items", "16", "--local-cpus", "2"]
    env = {**os.environ, "M3AE_SERVE_TOKEN": TOKEN, "RAY_DEDUP_LOGS": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "ready in" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"m3ae serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for p in session_processes(proc.pid):  # whatever is left of its Ray
            p.kill()


def call(url: str, path: str, body: bytes | None = None, ctype: str = "application/json",
         token: str | None = TOKEN) -> tuple[int, dict]:  # fmt: skip
    headers = {"content-type": ctype} if body is not None else {}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def vectors(answer: dict) -> np.ndarray:
    rows = [d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])]
    if isinstance(rows[0], str):
        return np.stack([np.frombuffer(base64.b64decode(r), "<f4") for r in rows])
    return np.asarray(rows, np.float32)


@pytest.mark.timeout(600)
def test_vectors_equal_m3ae_embed(server, model_dir, files, tmp_path):
    from m3ae.evaluate.embed import embed

    url, _, _ = server
    out = tmp_path / "emb"
    embed(model_dir, str(files), out, kinds=("image", "text", "joint"), dtype="float32",
          batch_size=BATCH, workers=1, progress=False)  # fmt: skip
    names = [f"img{i}.png" for i in range(8)]  # embed orders a folder's files by name
    captions = [(files / n).with_suffix(".txt").read_text() for n in names]
    raw = [b64((files / n).read_bytes()) for n in names]
    requests = {
        "image": {"image_paths": names},
        "text": {"texts": captions},
        "joint": {"images": raw, "texts": captions, "encoding_format": "base64"},
    }
    prefix = {"image": "img", "text": "text", "joint": "joint"}
    for kind, request in requests.items():
        status, answer = call(url, f"/v1/embeddings/{kind}", json.dumps(request).encode())
        assert status == 200, answer
        assert answer["kind"] == kind and answer["dim"] == 64 and answer["usage"]["items"] == 8
        want = np.load(out / f"{prefix[kind]}_emb" / f"{prefix[kind]}_emb_0.npy")
        got = vectors(answer)
        np.testing.assert_array_equal(got, want, err_msg=kind)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


@pytest.mark.timeout(300)
def test_model_card_health_and_auth(server, model_dir):
    url, _, _ = server
    assert call(url, "/health", token=None) == (200, {"status": "ok", "model": "tiny"})
    status, answer = call(url, "/v1/models", token=None)
    assert status == 401 and "bearer token" in answer["error"]["message"]
    assert call(url, "/v1/models", token="wrong")[0] == 401
    status, answer = call(url, "/v1/models")
    card = answer["data"][0]
    assert status == 200 and card["id"] == "tiny" and card["step"] == 7
    assert card["kinds"] == ["image", "text", "joint"] and card["dim"] == 64
    assert card["preprocess"]["image_size"] == 32 and card["preprocess"]["text_length"] == 16
    assert card["batching"]["max_batch_size"] == BATCH and card["batching"]["buckets"] == [
        1,
        2,
        4,
        8,
    ]
    assert card["limits"]["max_pixels"] == 20_000 and card["image_paths"] is True


@pytest.mark.timeout(300)
def test_concurrent_requests_share_forwards(server):
    url, _, _ = server
    before = call(url, "/v1/stats")[1]["batches"]["text"]
    bodies = [json.dumps({"texts": [f"caption {i}"]}).encode() for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda b: call(url, "/v1/embeddings/text", b), bodies))
    assert all(s == 200 for s, _ in answers)
    after = call(url, "/v1/stats")[1]["batches"]["text"]
    rows, batches = after["rows"] - before["rows"], after["batches"] - before["batches"]
    assert rows == 32
    assert batches <= 16, f"32 concurrent one-caption requests ran as {batches} forwards"
    # One request alone gives the same vector as inside a shared batch.
    alone = vectors(call(url, "/v1/embeddings/text", bodies[5])[1])
    np.testing.assert_allclose(alone, vectors(answers[5][1]), atol=1e-6)


@pytest.mark.timeout(300)
def test_every_limit_answers_4xx_and_the_replica_lives_on(server, files):
    url, _, _ = server
    big = png(300, 300, 0)  # 90,000 pixels > --max-pixels 20000
    cases = [
        (json.dumps({"images": [b64(big)]}), "application/json", 413, "exceeds max_pixels"),
        (json.dumps({"images": [b64(b"not an image")]}), "application/json", 400, r"images\[0\]"),
        (json.dumps({"texts": ["a"] * 17}), "application/json", 413, "17 items"),
        (json.dumps({"image_paths": ["../x.png"]}), "application/json", 403, "outside"),
        ("x" * 600_000, "application/json", 413, "request body"),
        ("{}", "text/plain", 415, "content type text/plain"),
    ]
    for body, ctype, status, match in cases:
        kind = "text" if '"texts"' in body else "image"
        got, answer = call(url, f"/v1/embeddings/{kind}", body.encode(), ctype)
        assert got == status, (match, answer)
        assert re.search(match, answer["error"]["message"]), answer
    assert call(url, "/v1/embeddings/audio", b"{}")[0] == 404
    assert call(url, "/v1/models", b"{}")[0] == 405
    # A multipart upload works after all of that: the replica is intact.
    boundary = "m3aeboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + (files / "img0.png").read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, answer = call(
        url, "/v1/embeddings/image", body, f"multipart/form-data; boundary={boundary}"
    )
    assert status == 200 and len(answer["data"]) == 1, answer
    counts = call(url, "/v1/stats")[1]["requests"]
    assert counts.get("413", 0) >= 3 and counts.get("415", 0) >= 1


@pytest.mark.timeout(300)
def test_sigterm_stops_the_server_and_its_ray(server):
    url, proc, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, log.read_text()[-3000:]
    assert "m3ae serve: stopping" in log.read_text()
    deadline = time.monotonic() + 30
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(1)
    left = [p.name() for p in session_processes(proc.pid)]
    assert not left, f"processes left behind: {left}"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/health", timeout=5)
