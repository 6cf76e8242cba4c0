"""An OpenAI-compatible HTTP API over a `BatchEngine` (Starlette; served by uvicorn).

    POST /v1/chat/completions   messages with text and image_url (data: URI) parts; stream: true for SSE
    GET  /v1/models             the one model this server holds
    GET  /health                {"status": "ok", "active": n, "queued": n}
    GET  /metrics               Prometheus text format

Extension fields: `exit` (never, router, layer:K) and `ignore_eos` (as vLLM names it) in the
request, `dyvte` in the response ({exit_layer, prefill_macs}). Errors are OpenAI-shaped:
{"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dyvte_rt.api.model import DyvteModel
from dyvte_rt.errors import DyvteError, InputError
from dyvte_rt.inputs.images import load_image
from dyvte_rt.inputs.preprocess import prepare_image
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
from dyvte_rt.serving.engine import BatchEngine, Completion, QueueFullError, ServeRequest
from dyvte_rt.serving.metrics import ServerMetrics


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 20 << 20  # a request body, base64 images included
    max_image_bytes: int = 15 << 20  # one decoded image file
    allow_local_images: Path | None = None  # image URLs may name files under this folder
    api_key: str | None = None


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def create_app(model: DyvteModel, engine: BatchEngine, model_name: str, limits: ServerLimits) -> Starlette:
    metrics = ServerMetrics(model.manifest.dims.num_layers)
    engine.on_finished, engine.on_cancelled = metrics.finished, metrics.cancelled
    api = _Api(model, engine, model_name, limits, metrics)
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _Api:
    def __init__(self, model, engine, model_name, limits, metrics) -> None:
        self.model, self.engine, self.name, self.limits, self.metrics_ = (
            model,
            engine,
            model_name,
            limits,
            metrics,
        )

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "active": self.engine.active, "queued": self.engine.queued})

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.metrics_.render(self.engine.queued, self.engine.active)
        return Response(body, media_type=content_type)

    async def models(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        entry = {"id": self.name, "object": "model", "created": 0, "owned_by": "dyvte-rt"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(self, request: Request) -> Response:
        try:
            raw = await self._read_body(request)  # read first: a client still sending sees the answer
        except ApiError as err:
            self.metrics_.rejected(err.status)
            return err.response()
        if (denied := self._check_key(request)) is not None:
            return denied
        try:
            body = self._parse_json(raw)
            serve_request, stream, events = self._build(body)
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
            self.metrics_.rejected(400)
            return ApiError(400, err.one_line()).response()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if stream:
            return StreamingResponse(
                self._stream(completion_id, serve_request, events), media_type="text/event-stream"
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

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise ApiError(
                413, f"the request body is over {self.limits.max_body_bytes} bytes", code="body_too_large"
            )
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.limits.max_body_bytes:
                    raise ApiError(
                        413,
                        f"the request body is over {self.limits.max_body_bytes} bytes",
                        code="body_too_large",
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "the client went away") from None
        return b"".join(chunks)

    @staticmethod
    def _parse_json(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _build(self, body: dict) -> tuple[ServeRequest, bool, asyncio.Queue]:
        model_name = body.get("model", self.name)
        if model_name != self.name:
            raise ApiError(
                404,
                f"the model {model_name!r} does not exist; this server has {self.name!r}",
                code="model_not_found",
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list")
        turns, image = self._conversation(messages)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings")
        try:
            sampling = SamplingConfig(
                temperature=float(body.get("temperature", 0.0) or 0.0),
                top_p=float(body.get("top_p", 1.0) or 1.0),
                seed=body.get("seed"),
            )
            policy = self.model.policy(body.get("exit"))
            self.model.pipeline.check_policy(policy)
        except (TypeError, ValueError) as err:
            raise ApiError(400, f"bad sampling parameters: {err}") from None
        except DyvteError as err:
            raise ApiError(400, err.one_line()) from None
        prompts = self.model.prompts
        try:
            prepared = None if image is None else prepare_image(image, self.model.manifest.vision)
            visual = None if prepared is None else prepared.visual_tokens
            ids = prompts.encode_turns(turns, with_image=image is not None, visual_tokens=visual)
        except DyvteError as err:
            raise ApiError(400, err.one_line()) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, payload: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        serve = ServeRequest(ids[0], prepared, policy, max_tokens, Sampler(sampling), tuple(stop), emit)
        serve.ignore_eos = bool(body.get("ignore_eos", False))  # an extension, as vLLM names it
        return serve, bool(body.get("stream", False)), events

    def _conversation(self, messages: list) -> tuple[list[tuple[str, str | None]], Image.Image | None]:
        """OpenAI messages -> (question, answer) turns with at most one image, in the first question."""
        turns: list[tuple[str, str | None]] = []
        image = None
        system = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{index}] must have a role of system, user or assistant")
            text, images = self._content(message.get("content"), index)
            role = message["role"]
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
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{index}].content must be a string or a list of parts")
        texts, images = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url", {})
                url = url.get("url") if isinstance(url, dict) else url
                if len(images) or not isinstance(url, str):
                    raise ApiError(400, f"messages[{index}]: one image_url with a url per message")
                images.append(self._image(url))
            else:
                raise ApiError(400, f"messages[{index}]: content parts must be text or image_url")
        if len(images) > 1:
            raise ApiError(400, "one image per conversation")
        return " ".join(texts), images

    def _image(self, url: str) -> Image.Image:
        if url.startswith("data:"):
            header, _, data = url.partition(",")
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
            return self._open(raw)
        root = self.limits.allow_local_images
        path = Path(url.removeprefix("file://"))
        if root is None or "://" in url.removeprefix("file://"):
            raise ApiError(400, "image URLs must be data: URIs (local files only with --allow-local-images)")
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise ApiError(403, "the image file is outside the folder --allow-local-images allows")
        return self._open(resolved)

    def _open(self, source: bytes | Path) -> Image.Image:
        try:
            return load_image(source)  # size limits, decompression bombs and bad files: one InputError
        except InputError as err:
            raise ApiError(400, err.one_line()) from None

    # -- responding -------------------------------------------------------------------------------

    async def _complete(self, request: Request, completion_id: str, serve: ServeRequest, events) -> Response:
        pieces = []
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    serve.cancelled.set()
                    return Response(status_code=499)
                continue
            if kind == "piece":
                pieces.append(payload)
            elif kind == "error":
                return ApiError(400, payload.one_line()).response()
            else:
                return JSONResponse(self._completion_body(completion_id, payload))

    async def _stream(self, completion_id: str, serve: ServeRequest, events):
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
                    error = {"error": {"message": payload.one_line(), "type": "server_error"}}
                    yield f"data: {json.dumps(error)}\n\n"
                    return
                else:
                    yield chunk({}, payload.finish_reason, self._extras(payload))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            serve.cancelled.set()  # a client that leaves frees its slot (a finished request ignores it)

    def _completion_body(self, completion_id: str, done: Completion) -> dict:
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
            **self._extras(done),
        }

    @staticmethod
    def _extras(done: Completion) -> dict:
        tokens = len(done.token_ids)
        return {
            "usage": {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": done.prompt_tokens + tokens,
            },
            "dyvte": {
                "exit_layer": done.exit_layer,
                "prefill_macs": done.prefill_macs,
                "ttft_ms": round(1e3 * done.ttft_s, 3),  # from joining the queue to the first token
                "latency_ms": round(1e3 * done.latency_s, 3),
            },
        }
