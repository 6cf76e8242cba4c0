"""An OpenAI-compatible HTTP API over a `BatchEngine` (Starlette; served by uvicorn).

    POST /v1/chat/completions   messages with text and image_url (data: URI) parts; stream: true for SSE
    GET  /v1/models             the one model this server holds
    GET  /health                {"status": "ok", "active": n, "queued": n, "slots": n, "max_queue": n}
    GET  /metrics               Prometheus text format
    GET  /                      the web page (dyvte_rt/serving/web/): ask about an image, see the exit

Extension fields: `exit` (never, router, layer:K), `exit_threshold` (the router's, 0..1), `prune`
(none, fastv:K:R, dart:K:R[:P]) and `ignore_eos` (as vLLM names it) in the request, `dyvte` in the
response ({exit_layer, exit_probs, threshold, prefill_macs, prefill_macs_saved, visual_tokens,
visual_tokens_kept, pruned_after_layer, kept_visual, ttft_ms, latency_ms, tokens_per_s}) and in
`/v1/models`' entry (layers, candidate exit layers, the default policies and threshold).

Every error, for every status (unknown routes and methods, and a failure inside the server,
included), is OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}; a client's
mistake is a 4xx, a failure of ours a 500 that ends only the request it hit, a stopped engine a 503
(and /health says so).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dyvte_rt.api.answer import Answer
from dyvte_rt.api.model import VISION_GRAPH, DyvteModel
from dyvte_rt.errors import DyvteError, InputError
from dyvte_rt.inputs.images import MAX_IMAGE_BYTES, load_image
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
from dyvte_rt.serving.engine import BatchEngine, EngineDown, QueueFullError, RequestFailed, ServeRequest
from dyvte_rt.serving.metrics import ServerMetrics
from dyvte_rt.serving.schema import ChatRequest, Message, parse_chat_request
from dyvte_rt.serving.webpage import web_routes
from engines.host_threads import lower_current_thread_priority


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 20 << 20  # a request body, base64 images included
    max_image_bytes: int = 15 << 20  # one image file, as sent
    max_image_memory: int = MAX_IMAGE_BYTES  # one image decoded and converted (images.decoded_bytes)
    allow_local_images: Path | None = None  # image URLs may name files under this folder
    api_key: str | None = None
    metrics_public: bool = False  # /metrics without the key
    body_timeout: float = 60.0  # seconds for the whole body to arrive once the headers have


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.headers = headers

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(
            body, status_code=self.status, headers={**(self.headers or {}), **(headers or {})}
        )

    @classmethod
    def serving(cls, err: DyvteError) -> ApiError:
        """The error a request ended with, as the status it deserves."""
        if isinstance(err, EngineDown):
            return cls(503, err.one_line(), "server_error", "engine_down")
        if isinstance(err, RequestFailed):
            return cls(500, err.one_line(), "server_error", "internal_error")
        return cls(400, err.one_line())


def _check_unicode(value) -> None:
    """UnicodeEncodeError for a lone surrogate anywhere in a parsed JSON value (JSON's escapes allow
    one; UTF-8 cannot hold it). ASCII strings, data URIs among them, are passed without a copy."""
    if isinstance(value, str):
        if not value.isascii():
            value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


async def _http_error(request: Request, err: HTTPException) -> Response:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    message = {
        404: f"no route {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    text = message.get(err.status_code, str(err.detail))
    return ApiError(err.status_code, text, kind).response(dict(err.headers or {}))


async def _server_error(request: Request, err: Exception) -> Response:
    return ApiError(500, f"internal error: {type(err).__name__}", "server_error", "internal_error").response()


def create_app(model: DyvteModel, engine: BatchEngine, model_name: str, limits: ServerLimits) -> Starlette:
    metrics = ServerMetrics(model.manifest.dims.num_layers)
    engine.on_finished, engine.on_cancelled, engine.on_step = (
        metrics.finished,
        metrics.cancelled,
        metrics.stepped,
    )
    api = _Api(model, engine, model_name, limits, metrics)
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        *web_routes(),
    ]
    handlers = {HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)


class _Api:
    def __init__(self, model, engine, model_name, limits, metrics) -> None:
        self.model, self.engine, self.name, self.limits, self.metrics_ = (
            model,
            engine,
            model_name,
            limits,
            metrics,
        )
        # images are decoded and prepared one at a time, off the event loop: a burst of big images
        # costs the memory of one. With the vision graph at low priority (--vision-priority) this
        # thread, which runs it, is lowered too: running streams' decode steps take the cores first.
        low = VISION_GRAPH in model.bundle.low_priority
        self.preparer = ThreadPoolExecutor(
            1, thread_name_prefix="dyvte-prepare", initializer=lower_current_thread_priority if low else None
        )

    async def health(self, request: Request) -> Response:
        if self.engine.failure is not None:
            body = {"status": "error", "reason": f"the engine has stopped ({self.engine.failure})"}
            return JSONResponse(body, status_code=503)
        return JSONResponse(
            {
                "status": "ok",
                "active": self.engine.active,
                "queued": self.engine.queued,
                "slots": self.engine.max_batch,
                "max_queue": self.engine.max_queue,
            }
        )

    async def metrics(self, request: Request) -> Response:
        if not self.limits.metrics_public and (denied := self._check_key(request)) is not None:
            return denied
        body, content_type = self.metrics_.render(self.engine.queued, self.engine.active)
        return Response(body, media_type=content_type)

    async def models(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        manifest = self.model.manifest
        dyvte = {
            "family": manifest.source.family,
            "layers": manifest.dims.num_layers,
            "exit_layers": list(manifest.exit.candidate_layers),
            "routers": manifest.exit.router_width is not None,
            "default_exit": manifest.exit.default_policy,
            "threshold": manifest.exit.threshold,
            "prune_layers": list(manifest.prune.layers) if manifest.prune is not None else [],
            "default_prune": manifest.prune.default_policy if manifest.prune is not None else "none",
        }
        entry = {"id": self.name, "object": "model", "created": 0, "owned_by": "dyvte-rt", "dyvte": dyvte}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:  # before a byte of the body is read
            return denied
        try:
            raw = await self._read_body(request)  # read first: a client still sending sees the answer
            chat = self._parse(raw)
            serve_request, events = await self._build(chat)
            self.engine.submit(serve_request)
        except ApiError as err:
            self.metrics_.rejected(err.status)
            return err.response()
        except QueueFullError as err:
            self.metrics_.rejected(503)
            return ApiError(503, err.one_line(), "server_overloaded", "queue_full").response(
                {"Retry-After": "1"}
            )
        except DyvteError as err:
            failure = ApiError.serving(err)
            self.metrics_.rejected(failure.status)
            return failure.response()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if chat.stream:
            return StreamingResponse(
                self._stream(completion_id, serve_request, events, chat.include_usage),
                media_type="text/event-stream",
            )
        return await self._complete(request, completion_id, serve_request, events)

    # -- parsing ----------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> Response | None:
        if self.limits.api_key is None:
            return None
        if request.headers.get("authorization", "") != f"Bearer {self.limits.api_key}":
            self.metrics_.rejected(401)
            return ApiError(
                401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key"
            ).response()
        return None

    async def _read_body(self, request: Request) -> bytearray:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise ApiError(
                413, f"the request body is over {self.limits.max_body_bytes} bytes", code="body_too_large"
            )
        try:
            return await asyncio.wait_for(self._receive_body(request), self.limits.body_timeout)
        except asyncio.TimeoutError:  # a client sending slowly, or not at all, holds nothing for long
            raise ApiError(
                408,
                f"the request body did not arrive within {self.limits.body_timeout:g} s",
                code="timeout",
                headers={"Connection": "close"},
            ) from None

    async def _receive_body(self, request: Request) -> bytearray:
        body = bytearray()  # one buffer, not chunks and their join
        try:
            async for chunk in request.stream():
                if len(body) + len(chunk) > self.limits.max_body_bytes:
                    raise ApiError(
                        413,
                        f"the request body is over {self.limits.max_body_bytes} bytes",
                        code="body_too_large",
                    )
                body += chunk
        except ClientDisconnect:
            raise ApiError(400, "the client went away") from None
        return body

    @staticmethod
    def _parse(raw: bytearray) -> ChatRequest:
        try:
            text = raw.decode("utf-8-sig")  # JSON is UTF-8 (RFC 8259); a BOM is allowed
            raw.clear()  # one copy of the body at a time: bytes, then text, then the parsed request
            body = json.loads(text)
            del text
            _check_unicode(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        except UnicodeEncodeError:
            raise ApiError(
                400, "the request holds text that is not valid Unicode (a lone surrogate)"
            ) from None
        except (RecursionError, ValueError) as err:
            raise ApiError(400, f"the request body cannot be read: {type(err).__name__}") from None
        chat, problem = parse_chat_request(body)
        if chat is None:
            raise ApiError(400, problem or "bad request")
        return chat

    async def _build(self, chat: ChatRequest) -> tuple[ServeRequest, asyncio.Queue]:
        if chat.model is not None and chat.model != self.name:
            raise ApiError(
                404,
                f"the model {chat.model!r} does not exist; this server has {self.name!r}",
                code="model_not_found",
            )
        try:
            sampling = SamplingConfig(
                temperature=chat.temperature or 0.0,
                top_p=1.0 if chat.top_p is None else chat.top_p,
                seed=chat.seed,
            )
            policy = self.model.policy(chat.exit, chat.exit_threshold)
            self.model.pipeline.check_policy(policy)
            prune = self.model.prune_policy(chat.prune)
            self.model.pipeline.check_prune(prune)
        except DyvteError as err:
            raise ApiError(400, err.one_line()) from None
        # decoding the image, preparing it and tokenising run on a worker thread: the event loop
        # (other streams, /health) carries on meanwhile
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter()
        ids, prepared = await loop.run_in_executor(self.preparer, self._prepare, chat.messages)
        # the request's TTFT counts from here: waiting for the preparing thread (one image at a time)
        # and preparing the image are its preprocess time, the vision graph its encoding time
        encoded_ms = prepared.encoded_ms if prepared is not None else 0.0
        preprocess_ms = 1e3 * (time.perf_counter() - arrived) - encoded_ms
        try:
            rule = self.model.stop_rule(chat.new_tokens, chat.stops, chat.ignore_eos)
        except DyvteError as err:
            raise ApiError(400, err.one_line()) from None
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, payload: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        request = ServeRequest(ids[0], prepared, policy, rule, Sampler(sampling), emit, preprocess_ms, prune)
        return request, events

    def _prepare(self, messages: list[Message]):
        """Messages -> (prompt ids, prepared and encoded image or None), on a worker thread: the
        image goes through the vision graph here, while the engine thread decodes."""
        turns, image = self._conversation(messages)
        try:
            prepared = None if image is None else self.model.family.prepare_image(image)
            visual = None if prepared is None else prepared.visual_tokens
            ids = self.model.prompts.encode_turns(turns, with_image=image is not None, visual_tokens=visual)
        except DyvteError as err:
            raise ApiError(400, err.one_line()) from None
        if prepared is not None and visual:
            try:
                prepared = self.model.pipeline.encode_image(prepared)
            except DyvteError as err:  # the backend failed: ours, not the client's
                raise ApiError(500, err.one_line(), "server_error", "internal_error") from None
        return ids, prepared

    def _conversation(
        self, messages: list[Message]
    ) -> tuple[list[tuple[str, str | None]], Image.Image | None]:
        """OpenAI messages -> (question, answer) turns with at most one image, in the first question."""
        turns: list[tuple[str, str | None]] = []
        image = None
        system = []
        for index, message in enumerate(messages):
            text, images = self._content(message.content, index)
            role = message.role
            if role == "system":
                system.append(text)
            elif role == "user":
                if images and (image is not None or turns):
                    raise ApiError(400, "one image per conversation, in its first user message")
                image = images[0] if images else image
                turns.append(("\n".join([*system, text]).strip() if not turns else text, None))
            else:
                if not turns or turns[-1][1] is not None:
                    raise ApiError(400, f"messages[{index}]: an assistant message must follow a user message")
                turns[-1] = (turns[-1][0], text)
        if not turns or turns[-1][1] is not None:
            raise ApiError(400, "the last message must come from the user")
        if not turns[-1][0].strip():
            raise ApiError(400, "the last user message has no text")
        return turns, image

    def _content(self, content, index: int) -> tuple[str, list[Image.Image]]:
        if isinstance(content, str):
            return content, []
        texts, images = [], []
        for part in content:
            if part.type == "text":
                texts.append(part.text)
                continue
            if images:
                raise ApiError(400, f"messages[{index}]: one image_url per message")
            images.append(self._image(part))
        return " ".join(texts), images

    def _image(self, part) -> Image.Image:
        url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
        part.image_url = None  # held here alone, the data URI's text goes once it is decoded
        if url.startswith("data:"):
            header, _, data = url.partition(",")
            del url
            if ";base64" not in header:
                raise ApiError(400, "image data: URIs must be base64-encoded")
            if len(data) * 3 // 4 > self.limits.max_image_bytes:
                raise ApiError(
                    413, f"the image is over {self.limits.max_image_bytes} bytes", code="image_too_large"
                )
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "the image is not valid base64") from None
            del data
            return self._open(raw)
        root = self.limits.allow_local_images
        path = Path(url.removeprefix("file://"))
        if root is None or "://" in url.removeprefix("file://"):
            raise ApiError(400, "image URLs must be data: URIs (local files only with --allow-local-images)")
        try:
            resolved = path.resolve()
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            raise ApiError(400, "the image path is not a valid file name") from None
        if not resolved.is_relative_to(root.resolve()):
            raise ApiError(403, "the image file is outside the folder --allow-local-images allows")
        return self._open(resolved)

    def _open(self, source: bytes | Path) -> Image.Image:
        try:
            # size and memory limits, decompression bombs and bad files: one InputError
            return load_image(source, self.limits.max_image_memory)
        except InputError as err:
            raise ApiError(400, err.one_line()) from None
        except (OSError, ValueError) as err:  # the path names no readable file
            raise ApiError(400, f"the image cannot be read: {type(err).__name__}") from None

    # -- responding -------------------------------------------------------------------------------

    async def _complete(self, request: Request, completion_id: str, serve: ServeRequest, events) -> Response:
        pieces = []
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), timeout=0.1)
            except TimeoutError:
                kind = None
            if await request.is_disconnected():  # looked at every token: cancelled within a step
                serve.cancelled.set()
                return Response(status_code=499)
            if kind is None:
                continue
            if kind == "piece":
                pieces.append(payload)
            elif kind == "error":
                return ApiError.serving(payload).response()
            else:
                return JSONResponse(self._completion_body(completion_id, payload, serve))

    async def _stream(self, completion_id: str, serve: ServeRequest, events, include_usage: bool = False):
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **(extra or {}),
            }
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, payload = await events.get()
                if kind == "piece":
                    yield chunk({"content": payload})
                elif kind == "error":
                    failure = ApiError.serving(payload)
                    error = {
                        "error": {"message": failure.message, "type": failure.kind, "code": failure.code}
                    }
                    yield f"data: {json.dumps(error)}\n\n"
                    return
                else:
                    extras = self._extras(payload, serve)
                    usage = extras.pop("usage")
                    yield chunk({}, payload.finish_reason, extras)
                    if include_usage:  # as OpenAI sends it: a last chunk with no choices
                        final = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                 "model": self.name, "choices": [], "usage": usage}  # fmt: skip
                        yield f"data: {json.dumps(final)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            serve.cancelled.set()  # a client that leaves frees its slot (a finished request ignores it)

    def _completion_body(self, completion_id: str, done: Answer, serve: ServeRequest) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "finish_reason": done.finish_reason,
                }
            ],
            **self._extras(done, serve),
        }

    @staticmethod
    def _extras(done: Answer, serve: ServeRequest) -> dict:
        tokens = len(done.token_ids)
        macs = done.prefill_macs
        decode_ms = done.timings_ms["decode"]
        return {
            "usage": {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": done.prompt_tokens + tokens,
            },
            "dyvte": {
                "policy": done.policy,
                "exit_layer": done.exit_layer,
                "exit_probs": {str(layer): p for layer, p in done.exit_probs.items()},
                "threshold": getattr(serve.policy, "threshold", None),  # a router policy's
                "prefill_macs": macs,
                "prefill_macs_saved": 1 - macs["actual"] / macs["full"] if macs["full"] else 0.0,
                "visual_tokens": done.visual_tokens,
                "visual_tokens_kept": done.visual_tokens_kept,
                "pruned_after_layer": done.pruned_after_layer,
                "kept_visual": done.kept_visual,
                # from the image's preparation (queueing included) to the first and the last token
                "ttft_ms": round(done.timings_ms["ttft"], 3),
                "latency_ms": round(done.timings_ms["latency"], 3),
                "tokens_per_s": (  # tokens after the first over the time they took
                    round((tokens - 1) * 1e3 / decode_ms, 3) if tokens > 1 and decode_ms else None
                ),
            },
        }
