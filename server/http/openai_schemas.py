"""OpenAI's legacy completions request, as nextchar reads it (a token is one character).

Fields OpenAI has and a character model cannot honour (suffix, best_of > 1, penalties,
logit_bias, token-id prompts) are refused with 400 naming the field, never silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_CHOICES = 64  # prompts x n in one request
STRINGS = "must be a string or a list of strings"


def _strings(value: Any, what: str) -> Any:
    if isinstance(value, str) or (isinstance(value, list)
                                  and all(isinstance(v, str) for v in value)):
        return value
    raise ValueError(what)


class StreamOptions(BaseModel):
    # strict: as OpenAI's API, "5" is not an integer and 1 is not true
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    # Unknown fields are ignored (clients send extras, e.g. the SDK's extra_body); known ones are
    # strictly typed, as OpenAI's API types them.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(description="A model of GET /v1/models.")
    prompt: str | list[str] = Field(description="One text, or a list (one completion each).")
    max_tokens: int | None = Field(16, ge=0, description="Characters to generate per choice.")
    temperature: float = Field(1.0, ge=0, description="0: greedy.")
    top_p: float = Field(1.0, ge=0, le=1, description="Nucleus sampling; 1: off; 0: only "
                         "the most likely character (greedy).")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Completions per prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 8 stop strings.")
    seed: int | None = Field(None, ge=0, lt=1 << 64, description="Same seed, same text; "
                             "choice i uses seed + i (mod 2**64).")
    logprobs: int | None = Field(None, ge=0, description="Top-k characters with their log "
                                 "probabilities, per character (at most max_top_k).")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text.")
    user: str | None = Field(None, description="Logged, not used.")
    stream: bool = Field(False, description="Server-sent events, ending with data: [DONE].")
    stream_options: StreamOptions | None = None
    top_k: int = Field(0, ge=0, description="nextchar extension: sample from the k most likely "
                       "characters; 0: all.")
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        return _strings(value, f"{STRINGS} (token-id arrays are not supported: one token is "
                               f"one character)")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return value if value is None else _strings(value, f"{STRINGS}, or null")

    @field_validator("temperature", "top_p", "n", "echo", "stream", "top_k", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's schema has these nullable (the SDK sends null for None): null = default."""
        return cls.model_fields[str(info.field_name)].default if value is None else value

    def unsupported(self) -> str | None:
        """The first field set that a character model cannot honour, if any."""
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of > 1:
            return "best_of"
        if self.presence_penalty not in (None, 0):
            return "presence_penalty"
        if self.frequency_penalty not in (None, 0):
            return "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        return None
