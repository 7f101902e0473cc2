"""The Ray Serve deployment behind `m3ae serve`: HTTP routes over one `Engine` per replica.

    GET  /health                  {"status": "ok", ...}            (no token needed)
    GET  /v1/models               the model card: kinds, dim, pooling, preprocessing, limits
    GET  /v1/stats                this replica's counters: requests by status, batches, rows
    POST /v1/embeddings/image     JSON {"images": [...]} / {"image_paths": [...]} or multipart
    POST /v1/embeddings/text      JSON {"texts": [...]} or multipart `text` fields
    POST /v1/embeddings/joint     both, paired

A JSON body may add `"encoding_format": "base64"` (a multipart one `?encoding_format=base64`):
each embedding is then the base64 of its little-endian float32 bytes instead of a list of
numbers. The answer is `{"object": "list", "model", "kind", "dim", "data": [{"index",
"embedding"}], "usage": {"items"}}`; an error is `{"error": {"status", "message"}}` with a 4xx
status for anything the client sent (see `m3ae.serve.inputs`), 401 without the bearer token
when one is set, and 500 for a failure of ours, logged; no request can take a replica down.

Batching: each request's items are decoded on a thread pool, then every item is handed to the
`serve.batch` queue of its kind, which runs a forward as soon as `max_batch_size` items wait or
`batch_wait_s` has passed since the first; items of many requests share one forward.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from m3ae.serve.engine import Engine, ServeSettings
from m3ae.serve.inputs import (
    Inputs,
    RequestError,
    check_body_size,
    parse_form,
    parse_json,
)

log = logging.getLogger("ray.serve")
PREFIX = "/v1/embeddings/"


def token_digest(token: str | None) -> str | None:
    """What replicas hold of the bearer token: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


@serve.deployment(name="m3ae-embeddings")
class EmbeddingService:
    def __init__(self, settings: ServeSettings, token_sha256: str | None = None):
        self.engine = Engine(settings)
        self.s, self.token_sha256 = settings, token_sha256
        self.decoders = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2)), "m3ae-decode")
        self.requests: dict[str, int] = {}  # status -> count
        self.batches = {k: {"batches": 0, "rows": 0} for k in self.engine.kinds}
        for batched in (self._image, self._text, self._joint):
            batched.set_max_batch_size(settings.max_batch_size)
            batched.set_batch_wait_timeout_s(settings.batch_wait_s)
        log.warning(
            "m3ae serve: %s ready (%s, D=%d, warm-up %.1f s)",
            self.engine.name,
            ",".join(self.engine.kinds),
            self.engine.dim,
            self.engine.warmup_s,
        )

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            response = await self._route(request)
        except RequestError as e:
            response = _error(e.status, e.message)
        except Exception as e:  # ours, not the client's: logged, answered, the replica lives on
            log.exception("m3ae serve: %s %s failed", request.method, request.url.path)
            response = _error(500, f"internal error: {type(e).__name__}: {e}")
        status = str(response.status_code)
        self.requests[status] = self.requests.get(status, 0) + 1
        return response

    # ------------------------------------------------------------------------------ routes
    async def _route(self, request: Request) -> JSONResponse:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path == "/health":
            _method(method, "GET")
            return JSONResponse({"status": "ok", "model": self.engine.name})
        self._authorize(request)
        if path == "/v1/models":
            _method(method, "GET")
            return JSONResponse({"object": "list", "data": [self.engine.describe()]})
        if path == "/v1/stats":
            _method(method, "GET")
            return JSONResponse({"requests": self.requests, "batches": self.batches})
        if path.startswith(PREFIX):
            kind = path[len(PREFIX) :]
            if kind not in ("image", "text", "joint"):
                raise RequestError(404, f"no endpoint {path}: use {PREFIX}image, text or joint")
            _method(method, "POST")
            self.engine.check_kind(kind)
            return await self._embed(kind, request)
        raise RequestError(404, f"no endpoint {path} (see GET /v1/models)")

    def _authorize(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token_digest(token.strip()) or "", self.token_sha256
        ):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer ...)")

    async def _embed(self, kind: str, request: Request) -> JSONResponse:
        inputs, encoding = await self._read(kind, request)
        loop = asyncio.get_running_loop()
        images = None
        if inputs.images is not None:
            decode = self.engine.decode_image
            images = await asyncio.gather(
                *(
                    loop.run_in_executor(self.decoders, decode, data, name)
                    for data, name in zip(inputs.images, inputs.names or [], strict=True)
                )
            )
        n = len(inputs)
        if kind == "image":
            rows = await asyncio.gather(*(self._image(x) for x in images))
        elif kind == "text":
            rows = await asyncio.gather(*(self._text(t) for t in inputs.texts))
        else:
            pairs = zip(images, inputs.texts, strict=True)
            rows = await asyncio.gather(*(self._joint(pair) for pair in pairs))
        data = [{"index": i, "embedding": _vector(r, encoding)} for i, r in enumerate(rows)]
        return JSONResponse(
            {
                "object": "list",
                "model": self.engine.name,
                "kind": kind,
                "dim": self.engine.dim,
                "data": data,
                "usage": {"items": n},
            }
        )

    async def _read(self, kind: str, request: Request) -> tuple[Inputs, str]:
        """The body, read with its size bounded, parsed by its content type."""
        limits = self.s.limits
        check_body_size(request.headers.get("content-length"), limits)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            check_body_size(len(body), limits)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            inputs = parse_json(bytes(body), kind, limits, self.s.file_root)
            return inputs, inputs.encoding
        if ctype == "multipart/form-data":
            encoding = request.query_params.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise RequestError(400, f"encoding_format must be float or base64: {encoding!r}")

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": bytes(body), "more_body": False}

            try:
                form = await Request(request.scope, receive).form(
                    max_files=limits.max_items, max_fields=2 * limits.max_items
                )
            except Exception as e:  # the multipart parser's own complaint
                raise RequestError(400, f"bad multipart body: {e}") from None
            fields = []
            for name, value in form.multi_items():
                if hasattr(value, "read"):  # an upload
                    value = (value.filename or "", await value.read())
                fields.append((name, value))
            return parse_form(fields, kind, limits), encoding
        raise RequestError(
            415, f"content type {ctype or 'none'}: send application/json or multipart/form-data"
        )

    # ---------------------------------------------------------------------------- batches
    async def _encode(self, kind: str, images: Any, texts: Any) -> list[np.ndarray]:
        n = len(images if images is not None else texts)
        self.batches[kind]["batches"] += 1
        self.batches[kind]["rows"] += n
        out = await asyncio.to_thread(self.engine.encode, kind, images, texts)
        return list(out)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _image(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return await self._encode("image", images, None)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _text(self, texts: list[str]) -> list[np.ndarray]:
        return await self._encode("text", None, texts)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _joint(self, pairs: list[tuple[np.ndarray, str]]) -> list[np.ndarray]:
        return await self._encode("joint", [p[0] for p in pairs], [p[1] for p in pairs])


def _method(got: str, want: str) -> None:
    if got != want:
        raise RequestError(405, f"use {want} here, not {got}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def _vector(row: np.ndarray, encoding: str) -> list[float] | str:
    row = np.asarray(row, "<f4")
    return base64.b64encode(row.tobytes()).decode() if encoding == "base64" else row.tolist()
