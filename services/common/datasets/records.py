"""The rows that pass between stages: the schemas of the prompts and teacher datasets.

These are the contract between the prompts, teacher and trainer services, the way the protos are the
contract between processes. Any Parquet reader can open them; nothing here depends on Stillhouse.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import pyarrow as pa

from stillhouse.common.datasets import sparse_logprobs

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# One prompt: the conversation to send the teacher (system message first, if any).
PROMPTS_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("messages", pa.list_(MESSAGE), nullable=False),
    ]
)

_ANSWER_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("messages", pa.list_(MESSAGE), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("completion_tokens", pa.int32(), nullable=False),
    pa.field("latency_seconds", pa.float32(), nullable=False),
    # How the token ids were obtained: server, bytes, retokenized, local or none (no logprobs).
    pa.field("token_id_source", pa.string(), nullable=False),
    # Top-k slots masked (alternative id unknown, or not sent by the server).
    pa.field("masked_alternatives", pa.int32(), nullable=False),
    # At temperature 0, positions where a known alternative beat the generated token.
    pa.field("top1_mismatches", pa.int32(), nullable=False),
    # The end-of-sequence label was appended: the server stopped without sending its stop token.
    pa.field("stop_token_added", pa.bool_(), nullable=False),
]

# A prompt the teacher did not answer, and why.
FAILURES_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)


def answers_schema(top_logprobs: int) -> pa.Schema:
    """One teacher answer per row, with its top-k logprobs in the sparse layout (k may be 0)."""
    return sparse_logprobs.arrow_schema(top_logprobs, _ANSWER_FIELDS)


def prompt_id(messages: Sequence[dict[str, str]]) -> str:
    """A stable id for a conversation: the same messages always get the same id."""
    canonical = json.dumps(
        [[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]
