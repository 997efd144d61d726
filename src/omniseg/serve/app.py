"""`omniseg serve`: a web page and a JSON API for any model omniseg loads.

    GET  /            the page (static files served by this app: no build step, no CDN)
    GET  /healthz     liveness
    GET  /v1/model    architecture, classes (dataset ids, names, colours), tasks, limits
    POST /v1/predict  an image (multipart field `image`, or the raw bytes as the body) -> predictions
    POST /v1/layers   query-based models: the largest segments' query masks, prediction set by set
    GET  /v1/stats    requests served and forward passes by batch size

Bad input never reaches the model: a body over the upload limit or an image over the pixel limit is
413, an unreadable image or a malformed request 400, a wrong parameter type 422, always as
{"error": "..."} naming the problem. Requests are batched by `BatchQueue` (batching.py).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from omniseg.data.errors import DataError
from omniseg.data.formats.files import MAX_IMAGE_PIXELS, decode_rgb_image
from omniseg.serve.batching import BatchQueue
from omniseg.serve.encode import SEMANTIC_FORMATS, encode_layers, encode_prediction, encode_view
from omniseg.tasks import check_tasks

STATIC = Path(str(resources.files("omniseg") / "serve" / "static"))


class APIError(Exception):
    """A request omniseg refuses: answered as {"error": message} with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(predictor, *, name: str = "model", max_batch: int = 8, max_wait_s: float = 0.005,
               max_upload_bytes: int = 50 << 20, view_max_side: int = 1600) -> FastAPI:
    """The server for one loaded `omniseg.api.Predictor` (`name`: what /v1/model reports as the weights)."""
    model, meta = predictor.model, predictor.meta

    def run_group(payloads: list[tuple[torch.Tensor, tuple[str, ...]]]) -> list[dict]:
        return predictor.predict_batch([image for image, _ in payloads], tasks=list(payloads[0][1]))

    queue = BatchQueue(run_group, max_batch=max_batch, max_wait_s=max_wait_s)
    with torch.no_grad():  # does the model have a query decoder to show layer by layer?
        probe = torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=predictor.device)
        has_layers = model.query_layers(model.normalize(probe)) is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        yield
        await queue.stop()

    # No Swagger / ReDoc pages: they load their scripts from a CDN. /openapi.json is served as usual.
    app = FastAPI(title="omniseg serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"{model.describe()} ({name}): segmentation over HTTP.")
    app.state.queue = queue
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    async def read_image(request: Request) -> torch.Tensor:
        """The uploaded image: multipart field `image`, or the whole body; limits checked before decoding."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes:
            raise APIError(413, f"upload of {int(length)} bytes is above the {max_upload_bytes}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload_bytes:
                raise APIError(413, f"upload is above the {max_upload_bytes}-byte limit")
        content_type = request.headers.get("content-type", "")
        name = "upload"
        data = bytes(body)
        if content_type.startswith("multipart/form-data"):
            async def parts():
                yield data
                yield b""

            try:
                form = await MultiPartParser(request.headers, parts()).parse()
            except MultiPartException as e:
                raise APIError(400, f"malformed multipart body: {e}") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "multipart upload without a file field named 'image'")
            name = upload.filename or "image"
            data = await upload.read()
        try:
            return await asyncio.to_thread(decode_rgb_image, data, name)
        except DataError as e:
            raise APIError(413 if "-pixel limit" in str(e) else 400, str(e)) from None

    def parse_tasks(tasks: list[str] | None) -> list[str]:
        names = [t.strip() for item in tasks or [] for t in item.split(",") if t.strip()]
        try:
            return check_tasks(names or predictor.tasks, model.tasks, what=model.describe())
        except ValueError as e:
            raise APIError(400, str(e)) from None

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": model.describe()}

    @app.get("/v1/model")
    async def model_info():
        return {
            "model": model.describe(), "arch": model.arch, "weights": name,
            "tasks": list(model.tasks), "default_tasks": list(predictor.tasks), "layers": has_layers,
            "postprocess_modes": list(model.postprocess_modes),
            "classes": [{"id": i, "category_id": meta.to_dataset_id(i), "name": c, "isthing": bool(meta.isthing[i]),
                         "color": list(meta.colors[i])} for i, c in enumerate(meta.classes)],
            "limits": {"max_upload_bytes": max_upload_bytes, "max_image_pixels": MAX_IMAGE_PIXELS,
                       "max_batch": max_batch, "view_max_side": view_max_side},
        }

    @app.post("/v1/predict")
    async def predict(request: Request,
                      tasks: list[str] | None = Query(None, description="tasks, comma-separated or repeated; "
                                                      "default: every task the model predicts"),
                      semantic_format: str = Query("png", description="png (label PNG of dataset ids) | rle"),
                      view: bool = Query(False, description="also the id maps the web page draws"),
                      score_threshold: float = Query(0.5, ge=0.0, le=1.0, description="instances in the view")):
        if semantic_format not in SEMANTIC_FORMATS:
            raise APIError(400, f"semantic_format must be one of {', '.join(SEMANTIC_FORMATS)}, got {semantic_format!r}")
        wanted = parse_tasks(tasks)
        image = await read_image(request)
        pred = await queue.submit((tuple(wanted), tuple(image.shape)), (image, tuple(wanted)))

        def encode() -> dict:
            out = {"tasks": wanted, **encode_prediction(pred, meta, semantic_format=semantic_format)}
            if view:
                out["view"] = encode_view(pred, meta, max_side=view_max_side, score_threshold=score_threshold)
            return out

        return await asyncio.to_thread(encode)

    @app.post("/v1/layers")
    async def layers(request: Request, max_queries: int = Query(4, ge=1, le=16)):
        if not has_layers:
            raise APIError(400, f"{model.describe()} has no query decoder to show layer by layer")
        image = await read_image(request)

        def run() -> dict:
            with torch.no_grad():
                batch, _ = predictor.prepare([image])
                x = model.normalize(batch.images.to(predictor.device))
                sets = [{k: v[0].cpu() for k, v in s.items()} for s in model.query_layers(x)]
            return encode_layers(sets, batch.image_sizes[0], tuple(x.shape[-2:]), meta, max_queries=max_queries)

        return await asyncio.to_thread(run)

    @app.get("/v1/stats")
    async def stats():
        return {"requests": queue.requests, "queued": queue.queue.qsize(),
                "forward_passes_by_batch_size": {str(k): v for k, v in sorted(queue.group_sizes.items())}}

    return app
