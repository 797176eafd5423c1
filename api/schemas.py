"""Request and response bodies of the HTTP API (pydantic), and their conversion from service records.

The OpenAI-compatible bodies follow OpenAI's field names and defaults; unknown fields are ignored
(clients send many), extra response fields (`citations`, `speculation`, `timings`) are additions.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from api.backend import ChatMessage, Citation, Final
from api.storage import DocumentRecord


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"is not valid Unicode (unpaired surrogate at character {err.start})") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
Stop = Text | Annotated[list[Text], Field(max_length=4)] | None


def stop_tuple(stop: Stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ---- documents -----------------------------------------------------------------------------------

class DocumentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Text = Field(min_length=1, description="the document, as text")
    name: Text | None = None


class IngestStepOut(BaseModel):
    name: str
    status: str
    seconds: float
    detail: str


class DocumentOut(BaseModel):
    id: str
    object: Literal["document"] = "document"
    name: str
    status: str
    stage: str
    progress: float
    created_at: float
    updated_at: float
    num_bytes: int
    num_chars: int
    num_tokens: int | None
    num_chunks: int | None
    steps: list[IngestStepOut]
    error: str | None

    @classmethod
    def from_record(cls, record: DocumentRecord) -> DocumentOut:
        info = record.info
        steps = [IngestStepOut(name=s.name, status=s.status, seconds=round(s.seconds, 3), detail=s.detail)
                 for s in (info.steps if info else ())]
        return cls(id=record.id, name=record.name, status=record.status.value, stage=record.stage,
                   progress=round(record.progress, 4), created_at=record.created_at,
                   updated_at=record.updated_at, num_bytes=record.num_bytes, num_chars=record.num_chars,
                   num_tokens=info.num_tokens if info else None, num_chunks=info.num_chunks if info else None,
                   steps=steps, error=record.error)


class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentOut]


class DocumentDeleted(BaseModel):
    id: str
    object: Literal["document"] = "document"
    deleted: bool = True


# ---- answers and their stats ---------------------------------------------------------------------

class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpeculationOut(BaseModel):
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: list[int]
    acceptance_rate: float
    mean_acceptance_length: float


class TimingsOut(BaseModel):
    queued_s: float | None
    ttft_s: float | None
    total_s: float | None
    retrieval_s: float
    prefill_s: float
    decode_s: float
    draft_s: float
    verify_s: float
    commit_s: float


class CitationOut(BaseModel):
    chunk_index: int
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    score: float
    snippet: str


def usage_out(final: Final) -> UsageOut:
    u = final.usage
    return UsageOut(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    total_tokens=u.total_tokens)


def speculation_out(final: Final) -> SpeculationOut:
    s = final.speculation
    return SpeculationOut(num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
                          num_accepted_tokens=s.num_accepted_tokens,
                          accepted_per_position=list(s.accepted_per_position),
                          acceptance_rate=round(s.acceptance_rate, 4),
                          mean_acceptance_length=round(s.mean_acceptance_length, 4))


def timings_out(final: Final) -> TimingsOut:
    s, t = final.speculation, final.timings

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return TimingsOut(queued_s=r(t.queued_s) if t else None, ttft_s=r(t.ttft_s) if t else None,
                      total_s=r(t.total_s) if t else None, retrieval_s=r(s.retrieval_seconds),
                      prefill_s=r(s.prefill_seconds), decode_s=r(s.decode_seconds), draft_s=r(s.draft_seconds),
                      verify_s=r(s.verify_seconds), commit_s=r(s.commit_seconds))


def citations_out(citations: tuple[Citation, ...]) -> list[CitationOut]:
    return [CitationOut(chunk_index=c.chunk_index, char_start=c.char_start, char_end=c.char_end,
                        token_start=c.token_start, token_end=c.token_end, score=c.score, snippet=c.snippet)
            for c in citations]


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: Text = Field(min_length=1, max_length=32_000)
    max_tokens: int | None = Field(default=None, ge=1, description="default: RAPID_DEFAULT_MAX_TOKENS")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: Stop = None
    stream: bool = False


class AskResponse(BaseModel):
    id: str
    object: Literal["document.answer"] = "document.answer"
    document_id: str
    model: str
    answer: str
    finish_reason: str
    target_context: str
    usage: UsageOut
    citations: list[CitationOut]
    speculation: SpeculationOut
    timings: TimingsOut

    @classmethod
    def build(cls, answer_id: str, document_id: str, model: str, text: str, final: Final) -> AskResponse:
        return cls(id=answer_id, document_id=document_id, model=model, answer=text,
                   finish_reason=final.finish_reason, target_context=final.target_context, usage=usage_out(final),
                   citations=citations_out(final.citations), speculation=speculation_out(final),
                   timings=timings_out(final))


class AskDelta(BaseModel):
    text: str


# ---- OpenAI-compatible ---------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    document_id: str | None = Field(default=None, description="ground the answer in this ingested document")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAIRequest):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: Literal[False] = False
    logprobs: None = None

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def to_message(self) -> ChatMessage:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage("system" if self.role == "developer" else self.role, content)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages")
    @classmethod
    def _has_user(cls, messages: list[ChatMessageIn]) -> list[ChatMessageIn]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("needs at least one user message")
        return messages

    @property
    def token_limit(self) -> tuple[int | None, str]:
        """The requested max tokens and the field it came from."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class _OpenAIResponse(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(_OpenAIResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageOut | None = None
    citations: list[CitationOut] | None = None
    speculation: SpeculationOut | None = None
    timings: TimingsOut | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str


class ChatCompletion(_OpenAIResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageOut
    citations: list[CitationOut] | None = None
    speculation: SpeculationOut | None = None
    timings: TimingsOut | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_OpenAIResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: UsageOut | None = None
    citations: list[CitationOut] | None = None
    speculation: SpeculationOut | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rapid"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    queue_depth: int
    documents: dict[str, int]
