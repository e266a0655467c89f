"""OpenAI-compatible request and response schemas (pydantic): the API's contract and its OpenAPI
document. `top_k`, `min_p` and `repetition_penalty` are extensions, as in vLLM.

Numbers must be finite (NaN and infinities are a 400) and `seed` in [0, 2**64). Fields that would
change the answer but are not implemented are a 400 naming the field, never silently ignored:
`tools`, `functions` (non-empty), `tool_choice`, `function_call` (other than "none"),
`response_format` (other than {"type": "text"}), `logit_bias` (non-empty), and for completions
`suffix` (non-empty) and `best_of` (above 1); `model` must be the served name or absent (checked
by the server). Every other unknown field (`user`, `metadata`, `store`, ...) is ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: bool = False


def _refuse(value, info: ValidationInfo):
    raise ValueError(f"{info.field_name} is not supported by this server: remove it")


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="the served model's id (GET /v1/models), or absent")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="new tokens at most (default: what the window leaves, "
        "capped by the server's --max-tokens)",
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0 = off)")
    min_p: float = Field(
        0.0, ge=0, lt=1, description="extension: drop tokens below min_p x the top probability"
    )
    repetition_penalty: float = Field(
        1.0, gt=0, description="extension: HF/CTRL repetition penalty"
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = Field(
        None, description="up to 4 strings that end the text (not included)"
    )
    n: int = Field(1, ge=1, description="choices to generate")
    seed: int | None = Field(
        None,
        ge=0,
        lt=1 << 64,
        description="same seed + same request = same tokens (choice i uses seed + i < 2**64)",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: absent or empty")

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v, info: ValidationInfo):
        return _refuse(v, info) if v else v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = Field(None, description="not supported: absent or empty")
    functions: list[Any] | None = Field(None, description="not supported: absent or empty")
    tool_choice: str | dict | None = Field(None, description='not supported: absent or "none"')
    function_call: str | dict | None = Field(None, description='not supported: absent or "none"')
    response_format: dict | None = Field(None, description='only {"type": "text"} (the default)')

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v, info: ValidationInfo):
        return _refuse(v, info) if v else v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v, info: ValidationInfo):
        return _refuse(v, info) if v not in (None, "none") else v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v, info: ValidationInfo):
        return _refuse(v, info) if v is not None and v.get("type", "text") != "text" else v


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(
        None, ge=0, le=20, description="top alternatives per token (legacy format)"
    )
    echo: Literal[False] = Field(False, description="not supported: must be false")
    suffix: str | None = Field(None, description="not supported: absent or empty")
    best_of: int | None = Field(None, description="not supported: absent or 1")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v, info: ValidationInfo):
        return _refuse(v, info) if v else v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v, info: ValidationInfo):
        return _refuse(v, info) if v not in (None, 1) else v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zerolm"
    max_model_len: int
    special_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="zerolm extension: the tokenizer's special tokens by role (bos, eos, pad, unk, "
        "turn_end), as the model spells them",
    )
    stop_tokens: list[str] = Field(
        default_factory=list, description="zerolm extension: the tokens that end a chat reply"
    )
    chat_template: Literal["model", "zerolm"] | None = Field(
        None,
        description="zerolm extension: the chat template chat completions render with: the "
        "model's own (an imported model's Jinja template), zerolm's, or none",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AttentionRequest(BaseModel):
    """Text to look into: a conversation (rendered with the chat template) or a completion
    prompt, optionally followed by generated tokens given exactly, as the `bytes` of their
    logprobs entries."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    continuation: list[list[Annotated[int, Field(ge=0, le=255)]]] | None = Field(
        None, description="generated tokens, each as its bytes; they follow the generation prompt"
    )
    layer: int = Field(0, ge=0)
    head: int = Field(0, ge=0)


class AttentionResponse(BaseModel):
    tokens: list[str] = Field(
        description="the context, one entry per token (special tokens by name)"
    )
    token_bytes: list[list[int]] = Field(
        description="the UTF-8 bytes of each token (empty for special tokens)"
    )
    offset: int = Field(
        description="index of the first continuation token (= number of tokens without it)"
    )
    layer: int
    head: int
    n_layers: int
    n_heads: int
    weights: list[list[float]] = Field(
        description="(T, T): row t = token t's attention over tokens 0..t"
    )
