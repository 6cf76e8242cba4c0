"""The chat-completions request as typed models (pydantic): every field's type and range checked
in one place, booleans and integers strict, and the OpenAI fields this server cannot honour refused
rather than ignored. `parse_chat_request` turns any mistake into one line naming the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

# OpenAI's ranges; a number, never a string that looks like one
Temperature = Annotated[StrictFloat, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Threshold = Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
MaxTokens = Annotated[StrictInt, Field(ge=1, le=1_000_000)]
StopText = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "detail" is a hint this server has no use for
    url: StrictStr


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageUrl | StrictStr


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "name" and the like change nothing here
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[Part]


class ChatRequest(BaseModel):
    """What POST /v1/chat/completions accepts. Unknown fields are ignored, as OpenAI-compatible
    servers do, except those below that would change the answer and are refused."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=256)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    exit: StrictStr | None = None  # extension: never, router, layer:K
    exit_threshold: Threshold | None = None  # extension: the router's threshold for this request
    prune: StrictStr | None = None  # extension: none, fastv:K:R, dart:K:R[:P]
    ignore_eos: StrictBool = False  # extension, as vLLM names it
    # accepted only where they change nothing
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=0.0, le=0.0)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=0.0, le=0.0)] | None = None

    def unsupported(self) -> str | None:
        """The first field asking for something this server does not do, if any."""
        if self.logit_bias:
            return "logit_bias is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format other than text is not supported"
        if self.tools:
            return "tools are not supported"
        return None

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_MEANING = {  # what a refused field means, in the words of the API
    "n": "n must be 1 (one choice per request)",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "tool_choice": "tools are not supported",
    "frequency_penalty": "frequency_penalty is not supported (only 0)",
    "presence_penalty": "presence_penalty is not supported (only 0)",
}


def parse_chat_request(body: object) -> tuple[ChatRequest | None, str | None]:
    """(request, None) or (None, a one-line reason naming the first bad field)."""
    if not isinstance(body, dict):
        return None, "the request body must be a JSON object"
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        field = str(first["loc"][0]) if first["loc"] else ""
        if field in _MEANING:
            return None, _MEANING[field]
        return None, f"{where}: {first['msg']}"[:300]
    problem = request.unsupported()
    return (None, problem) if problem else (request, None)
