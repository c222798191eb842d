"""`vismem serve`: the memory over HTTP (FastAPI on uvicorn), for callers that classify often.

One process holds one `Memory`: the encoder is loaded once, the live index stays loaded while it
is live, and a new version (an add, a forget, a compaction by another process) is picked up on
the next request, as every search looks up the live version. Requests enter the memory one at
a time (a lock): the encoder and the searcher use every core already.

Uploads are untrusted: a request body is bounded before it is read (MAX_REQUEST_BYTES, and a
length is required), each file is decoded by the one decoder ingest and classify use
(`imagesets.decode_image`: bounded pixels, aspect, no decompression bombs), and nothing is
written to disk. Bad input gets a 4xx with a sentence saying what to send instead; never a 500.
"""
from __future__ import annotations

import dataclasses
import tempfile
import threading
from importlib.resources import files as package_files
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .evaluation import DEFAULT_K
from .imagesets import MAX_BYTES, ImageRefused, decode_image
from .memory import Memory
from .voting import DEFAULT_STRATEGY, STRATEGIES

MAX_REQUEST_BYTES = MAX_BYTES          # one request's body: one image at the file limit, or several smaller
MAX_FILES = 256                        # images per /classify request
Strategy = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]
Pruning = Literal["none", "soft", "hard"]

_FILES_HELP = ("one or more images (JPEG, PNG, WebP, BMP, GIF), each a part named `files` of a multipart/form-data "
               f"body of at most {MAX_REQUEST_BYTES // 2**20} MiB in all")


def _decode(upload: UploadFile) -> tuple[object | None, str | None]:
    """(image, None), or (None, why it cannot be used)."""
    data = upload.file.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        return None, f"{upload.filename}: larger than {MAX_BYTES // 2**20} MiB"
    try:
        image, _ = decode_image(data)
    except ImageRefused as exc:
        return None, f"{upload.filename} is not a readable image: {exc}"
    return image, None


def create_app(memory: Memory) -> FastAPI:
    app = FastAPI(title="vismem", summary="A visual memory: classify images by a vote over their nearest stored "
                                          "neighbours, each decision explained by the images that made it.",
                  docs_url=None, redoc_url=None)
    # The OpenAPI page from files that ship in a package: FastAPI's default loads Swagger UI from
    # a CDN, and a machine without the internet would show a blank page.
    app.mount("/docs-assets", StaticFiles(directory=str(package_files("swagger_ui") / "static")), name="docs-assets")
    app.state.memory = memory
    lock = threading.Lock()

    @app.middleware("http")
    async def bounded_body(request: Request, call_next):
        """Refuse a body too large (or of unknown length) before a byte of it is read."""
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return JSONResponse({"detail": "send a Content-Length: bodies of unknown length are refused"}, 411)
            if not length.isdigit() or int(length) > MAX_REQUEST_BYTES:
                return JSONResponse({"detail": f"the request body is {length} bytes; at most {MAX_REQUEST_BYTES} "
                                               "(64 MiB) are read: send fewer or smaller images per request"}, 413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def unclear_request(request: Request, exc: RequestValidationError):
        """FastAPI's 422, with a sentence first: which field or parameter, and what it should be."""
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            if err.get("loc", ())[:2] == ("body", "files") and err.get("type") == "missing":
                problems.append("no images: send them as multipart/form-data parts named 'files'")
            else:
                problems.append(f"{where}: {err.get('msg')}")
        return JSONResponse({"detail": "; ".join(problems), "errors": jsonable_encoder(exc.errors())}, 422)

    def openapi() -> dict:
        """FastAPI's description, each uploaded file also marked `format: binary` (OpenAPI 3.0's
        spelling, beside 3.1's contentMediaType) so that the /docs page offers a file chooser."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _mark_binary(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="vismem: API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/healthz", summary="Liveness: the server answers (and the memory was opened)")
    def healthz() -> dict:
        return {"ok": True, "home": str(memory.layout.root)}

    @app.get("/status", summary="What `vismem status --json` prints: samples, labels, live index versions, settings")
    def status() -> dict:
        with lock:
            return jsonable_encoder(memory.status())

    @app.post("/classify", summary="Predict a label for each image, with the neighbours that decided it",
              description="The answer is a list with one object per image, in order: what `vismem classify --json` "
                          "prints (a file that is not a usable image gets an object with `error`, and the rest are "
                          "classified; when none is usable the answer is 400).")
    def classify(files: list[UploadFile] = File(..., description=_FILES_HELP),
                 k: int = Query(DEFAULT_K, ge=1, le=1000, description="neighbours that vote"),
                 strategy: Strategy = Query(DEFAULT_STRATEGY, description="how a neighbour's vote is weighted"),
                 pruning: Pruning | None = Query(None, description="vote weights from pruning; default: the "
                                                                    "memory's active weight set"),
                 unknown: bool = Query(False, description="answer 'unknown' beyond the memory's novelty threshold"),
                 ) -> list[dict]:
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"{len(files)} images in one request; at most {MAX_FILES}: split the request")
        decoded = [_decode(f) for f in files]
        good = [(f, image) for f, (image, why) in zip(files, decoded) if why is None]
        if not good:
            raise HTTPException(400, "none of the uploads is an image vismem can read: "
                                 + "; ".join(why for _, why in decoded))
        with lock:
            predictions = iter(_predict(memory, [image for _, image in good], k, strategy, pruning, unknown))
        return [{"path": f.filename, "error": why} if why else
                dataclasses.replace(next(predictions), path=f.filename).to_dict()
                for f, (_, why) in zip(files, decoded)]

    @app.post("/explain", summary="One image's prediction as a picture of its neighbours (PNG) or a page (HTML)",
              response_class=Response, responses={200: {"content": {"image/png": {}, "text/html": {}}}})
    def explain(file: UploadFile = File(..., description="one image, as the multipart part `file`"),
                format: Literal["png", "html"] = Query("png"), k: int = Query(10, ge=1, le=100),
                strategy: Strategy = Query(DEFAULT_STRATEGY)) -> Response:
        from .explain import render

        image, why = _decode(file)
        if why:
            raise HTTPException(400, why)
        with lock:
            (prediction,) = _predict(memory, [image], k, strategy, None, False)
        prediction = dataclasses.replace(prediction, path=file.filename)
        with tempfile.TemporaryDirectory(prefix="vismem-explain-") as tmp:
            out = render(prediction, image, Path(tmp) / f"explained.{format}", strategy=strategy)
            body = out.read_bytes()
        return Response(body, media_type="image/png" if format == "png" else "text/html")

    return app


def _mark_binary(node) -> None:
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
            node["format"] = "binary"
        for value in node.values():
            _mark_binary(value)
    elif isinstance(node, list):
        for value in node:
            _mark_binary(value)


def _predict(memory: Memory, images: list, k: int, strategy: str, pruning: str | None, unknown: bool) -> list:
    try:
        return memory.classify(images, k=k, strategy=strategy, progress=False, unknown=unknown, pruning=pruning)
    except FileNotFoundError as exc:  # no live index yet: the memory is empty
        raise HTTPException(409, str(exc)) from None


def serve(memory: Memory, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    memory.encoder  # loaded before the first request, not during it
    uvicorn.run(create_app(memory), host=host, port=port, log_level="info")
