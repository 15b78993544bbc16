"""The JSON bodies the service accepts (pydantic models; FastAPI validates them and lists them
in /docs). Unknown fields are refused, except on the OpenAI-compatible endpoint, whose clients
send fields of their own. Counts are strict JSON integers (`"k": true` or `"k": 4.0` is refused,
not read as 1 or 4). The field names are the project's one vocabulary (docs/vocabulary.md):
`text` is what a query says, whatever the endpoint (`query`, the old name on /v1/search, is
still read, with a deprecation header)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from ...core.choices import Calibration, Scoring, SelectionMethod

__all__ = ["ClassifyRequest", "GenerateRequest", "SearchRequest", "CompletionRequest", "MAX_K"]

MAX_K = 256  # demonstrations per query (cached scoring keeps them all: each costs its keys and values in memory)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Strict):
    index: str
    text: str | None = Field(None, description="One text; the answer is then one prediction, as `icl classify --json`.")
    texts: list[str] | None = Field(None, description="Several texts; the answer is {\"predictions\": [...]}.")
    k: StrictInt | None = Field(None, ge=0, le=MAX_K)
    method: SelectionMethod | None = None
    calibration: Calibration | None = None
    scoring: Scoring | None = Field(None, description="exact (default) or cached: the demonstrations' keys/values "
                                    "from the index's KV cache (`icl index cache`).")
    soft_prompt: str | None = Field(None, description="A soft prompt folder's name under the adapters dir.")
    labels: list[str] | None = Field(None, description="The label set the client expects; another index's "
                                     "labels are an error instead of an answer.")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of text and texts")
        return self


class GenerateRequest(_Strict):
    index: str
    input: str
    k: StrictInt | None = Field(None, ge=0, le=MAX_K)
    method: SelectionMethod | None = None
    soft_prompt: str | None = None
    max_new_tokens: StrictInt | None = Field(None, ge=1, le=2048)
    stream: bool = Field(False, description="Server-sent events: one `data: {\"output\": ...}` per piece, then "
                         "`event: done` with the whole generation.")


class SearchRequest(_Strict):
    index: str
    text: str | None = Field(None, description="The query text.")
    query: str | None = Field(None, description="Deprecated name of `text`.")
    k: StrictInt = Field(8, ge=1, le=MAX_K)
    mmr: float | None = Field(None, ge=0.0, le=1.0, description="MMR lambda (1 = pure similarity).")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.text is None) == (self.query is None):
            raise ValueError("give the query as text")
        return self


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request (the fields this LM can honour)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt = Field(16, ge=0, le=2048)
    echo: bool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="One completion per prompt.")
    stream: bool = Field(False, description="Not supported here: use /v1/generate for a stream.")
