"""What is asked of a teacher and what it answers, independent of the backend that answers.

`TeacherCall` holds everything that can change an answer, and whose answer it is (`cache_scope`), so
its `cache_key` is the identity of the call: two calls with the same key get the same stored answer and
the teacher is asked only once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np

from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs

# Bump when the meaning of a stored answer changes, so old cache entries stop matching.
CACHE_FORMAT = 3


def cache_scope(tenant: str, api_key: str | None) -> str:
    """Who may read a cached answer: the tenant that asked and the API key that paid, the key by its
    SHA-256 only. Two jobs of one tenant using one key share answers; other tenants or keys do not."""
    credential = hashlib.sha256(api_key.encode()).hexdigest() if api_key else ""
    return f"{tenant}/{credential}"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class TeacherCall:
    backend: str
    base_url: str
    model: str
    revision: str
    messages: tuple[ChatMessage, ...]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    top_logprobs: int
    # Server-specific request fields (`sampling.extraBody`), sorted by name.
    extra_body: tuple[tuple[str, bool | int | float | str], ...] = ()
    # `cache_scope(tenant, api_key)`: part of the key, never sent to the teacher.
    scope: str = ""
    # A local teacher's `precision`; empty for a server, whose keys stay as they were before it existed.
    precision: str = ""

    def cache_key(self) -> str:
        fields = {name: value for name, value in asdict(self).items() if name != "precision" or value}
        identity = {"format": CACHE_FORMAT, **fields}
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


class TokenIdSource(StrEnum):
    """How an answer's token ids were obtained (see backends/openai_capture.py)."""

    SERVER = "server"  # the server sent ids
    BYTES = "bytes"  # the server's token bytes, through the teacher's vocabulary
    RETOKENIZED = "retokenized"  # the answer re-tokenised and aligned with the logprob positions
    LOCAL = "local"  # a local model: ids are what it generated
    NONE = "none"  # no logprobs asked for, so no ids


@dataclass
class TeacherAnswer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_seconds: float
    # Per generated token: the token ids, their top-k alternatives and the tail mass. None when the call
    # asked for no logprobs (top_logprobs == 0).
    logprobs: SparseLogprobs | None = None
    token_id_source: TokenIdSource = TokenIdSource.NONE
    # Alternatives whose id is unknown or that the server did not send (masked slots), over the
    # positions the server sent.
    masked_alternatives: int = 0
    # At temperature 0, positions where a known alternative is more likely than the generated token.
    top1_mismatches: int = 0
    # Whether the end-of-sequence label was appended because the server left its stop token out.
    stop_token_added: bool = False
    cached: bool = field(default=False, compare=False)

    @property
    def token_ids(self) -> np.ndarray | None:
        return None if self.logprobs is None else self.logprobs.token_ids


class FailureKind(StrEnum):
    UNREACHABLE = "unreachable"  # connection refused, DNS, TLS
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx
    UNAUTHENTICATED = "unauthenticated"  # 401/403
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_TOO_LONG = "context_too_long"
    BAD_REQUEST = "bad_request"  # other 4xx
    MALFORMED_RESPONSE = "malformed_response"
    MISSING_LOGPROBS = "missing_logprobs"
    UNMAPPABLE_TOKEN = "unmappable_token"  # a generated token whose id cannot be known
    CIRCUIT_OPEN = "circuit_open"
    EGRESS_REFUSED = "egress_refused"  # the teacher's address is outside the egress policy


# Failures that may pass if the same call is made again later.
RETRYABLE = frozenset(
    {FailureKind.UNREACHABLE, FailureKind.TIMEOUT, FailureKind.RATE_LIMITED, FailureKind.SERVER_ERROR}
)


class TeacherCallError(Exception):
    """A call the teacher did not answer. The message names the cause and never holds an API key."""

    def __init__(self, kind: FailureKind, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
        # Seconds the server asked us to wait (Retry-After), if it said.
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE
