"""Exact token ids for a chat completion's logprobs, and a record of how they were obtained.

Ids come, per response, from the first of these that the server allows (`TokenIdSource`):

- SERVER: the server wrote every token as ``token_id:N`` (vLLM's `return_tokens_as_token_ids`);
- BYTES: the server sent the UTF-8 `bytes` of every generated token (OpenAI; llama.cpp's own server),
  looked up in the teacher's byte vocabulary (`TokenVocabulary`);
- RETOKENIZED: otherwise the answer text is re-tokenised with the teacher's tokenizer and aligned with
  the logprob positions, byte offset by byte offset. llama-cpp-python's server needs this: it writes a
  token that ends inside a UTF-8 character as the text of its whole characters only ("" or " "), with
  `bytes: null`. A position whose id is known from its bytes or its text must sit at the same offset
  of the answer, and a re-tokenised id is taken only where a token boundary falls at that offset and
  the server's text for the position is one that id can be written as. Servers that re-encode lossy
  text as `bytes` (vLLM, SGLang: U+FFFD for a partial character) are read by their text there instead.

The generated token's own id must be known; when it is not, the prompt fails with UNMAPPABLE_TOKEN.
An alternative's id is taken from its bytes, else its text when only one token can be written so, else
it is the generated token listed again (same text, same logprob); otherwise its slot is masked (id -1,
`LOGPROB_FLOOR`) and its mass stays in the tail. So are alternatives the server did not send. Repeats
of one alternative count once; two alternatives that map to the same id are merged, their
probabilities summed. When the server stopped (`finish_reason` "stop") without sending its stop token,
the tokenizer's end-of-sequence id is appended as a label whose distribution is unknown: every slot
masked, tail 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np

from stillhouse.common.datasets.sparse_logprobs import LOGPROB_FLOOR, MASKED_ID, SparseLogprobs
from stillhouse.teacher.calls import FailureKind, TeacherCallError, TokenIdSource
from stillhouse.teacher.token_vocabulary import REPLACEMENT_BYTES, TokenVocabulary

# vLLM's `return_tokens_as_token_ids` writes every logprob token as this prefix and the id.
TOKEN_ID_PREFIX = "token_id:"
# A known alternative more likely than the generated token by more than this, at temperature 0, is a
# top-1 mismatch (servers print logprobs rounded to float32).
_TOP1_TOLERANCE = 1e-5

_bytes_decoder = msgspec.json.Decoder(list[int] | None)


class Alternative(Protocol):
    token: str
    logprob: float
    bytes: msgspec.Raw


class Position(Alternative, Protocol):
    top_logprobs: list


@dataclass(frozen=True)
class Capture:
    logprobs: SparseLogprobs
    token_id_source: TokenIdSource
    # Masked slots among the positions the server sent (an appended stop label is not counted).
    masked_alternatives: int
    # Positions where, at temperature 0, a known alternative is more likely than the generated token.
    top1_mismatches: int
    stop_token_added: bool


def capture_logprobs(
    content: Sequence[Position],
    k: int,
    *,
    text: str,
    finish_reason: str,
    temperature: float,
    vocabulary: TokenVocabulary | None,
    ids_from_server: bool,
) -> Capture:
    """The sparse top-k layout of `content`, ids obtained as the module docstring says. `vocabulary`
    may be None only when `ids_from_server`; it also gives the end-of-sequence label."""
    steps = len(content)
    for step, position in enumerate(content):
        if not position.top_logprobs:
            raise TeacherCallError(
                FailureKind.MISSING_LOGPROBS,
                f"generated token {step} has no top_logprobs alternatives though {k} were asked for",
            )
    counts = np.fromiter((len(position.top_logprobs) for position in content), dtype=np.int64, count=steps)
    alternatives = [entry for position in content for entry in position.top_logprobs]
    logprobs = np.fromiter(
        (entry.logprob for entry in alternatives), dtype=np.float64, count=len(alternatives)
    )
    if ids_from_server:
        sampled = token_ids_from_server([position.token for position in content])
        alternative_ids = token_ids_from_server([entry.token for entry in alternatives])
        source = TokenIdSource.SERVER
    else:
        if vocabulary is None:
            raise ValueError("token ids come from a tokenizer's vocabulary or from the server: give one")
        sampled, source = _sampled_ids(content, text, vocabulary)
        alternative_ids = _alternative_ids(content, sampled, vocabulary)
    rows = np.repeat(np.arange(steps), counts)
    topk_ids, topk_logprobs = _top_k(rows, alternative_ids.astype(np.int64), logprobs, steps, k)
    known = topk_ids != MASKED_ID
    top_mass = np.where(known, np.exp(topk_logprobs), 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        tail = np.maximum(np.log1p(-np.minimum(top_mass, 1.0)), LOGPROB_FLOOR)
    mismatches = 0
    if temperature == 0 and steps:
        sampled_logprobs = np.fromiter((position.logprob for position in content), np.float64, steps)
        mismatches = int(
            (
                known[:, 0]
                & (topk_ids[:, 0] != sampled)
                & (topk_logprobs[:, 0] > sampled_logprobs + _TOP1_TOLERANCE)
            ).sum()
        )
    sparse = SparseLogprobs(
        token_ids=sampled.astype(np.int32),
        topk_ids=topk_ids.astype(np.int32),
        topk_logprobs=topk_logprobs.astype(np.float32),
        tail_logprob=tail.astype(np.float32),
    )
    stop_added = (
        finish_reason == "stop"
        and vocabulary is not None
        and vocabulary.eos_id is not None
        and (steps == 0 or int(sampled[-1]) not in vocabulary.special_ids)
    )
    if stop_added:
        sparse = with_end_label(sparse, vocabulary.eos_id)
    return Capture(
        logprobs=sparse,
        token_id_source=source,
        masked_alternatives=int(steps * k - known.sum()),
        top1_mismatches=mismatches,
        stop_token_added=stop_added,
    )


def with_end_label(logprobs: SparseLogprobs, eos_id: int) -> SparseLogprobs:
    """`logprobs` with one more position: the label `eos_id`, nothing of its distribution known."""
    k = logprobs.k
    return SparseLogprobs(
        token_ids=np.append(logprobs.token_ids, np.int32(eos_id)).astype(np.int32),
        topk_ids=np.vstack([logprobs.topk_ids, np.full((1, k), MASKED_ID, np.int32)]),
        topk_logprobs=np.vstack([logprobs.topk_logprobs, np.full((1, k), LOGPROB_FLOOR, np.float32)]),
        tail_logprob=np.append(logprobs.tail_logprob, np.float32(0.0)).astype(np.float32),
    )


# --- ids from the server -----------------------------------------------------------------------


def token_ids_from_server(tokens: list[str]) -> np.ndarray:
    """The ids in vLLM ``token_id:1234`` tokens."""
    if not tokens:
        return np.empty(0, dtype=np.int32)
    # Parsed as one string, not token by token: this runs for every one of a response's many tokens.
    joined = ",".join(tokens)
    pieces = joined.replace(TOKEN_ID_PREFIX, "").split(",")
    every_token_is_prefixed_once = (
        len(pieces) == len(tokens)
        and joined.startswith(TOKEN_ID_PREFIX)
        and joined.count("," + TOKEN_ID_PREFIX) == len(tokens) - 1
        and joined.count(TOKEN_ID_PREFIX) == len(tokens)
    )
    if every_token_is_prefixed_once:
        try:
            ids = np.array(pieces, dtype=np.int64)
        except ValueError:
            pass
        else:
            if ids.min() >= 0 and ids.max() < 2**31:
                return ids.astype(np.int32)
    unreadable = next((token for token in tokens if not _TOKEN_ID.fullmatch(token)), tokens[0])
    raise TeacherCallError(
        FailureKind.MALFORMED_RESPONSE,
        f"asked for token ids (return_tokens_as_token_ids, a vLLM extension) but got the token "
        f"{quote(unreadable)}: this server does not give ids; give the teacher a tokenizer instead",
    )


_TOKEN_ID = re.compile(re.escape(TOKEN_ID_PREFIX) + r"\d{1,9}")


# --- ids from the teacher's vocabulary ---------------------------------------------------------


def _trusted_bytes(raw: msgspec.Raw) -> bytes | None:
    """The bytes a server sent for a token, unless it sent none or re-encoded lossy text."""
    try:
        values = _bytes_decoder.decode(raw)
        piece = None if values is None else bytes(values)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
        sent = bytes(raw).decode(errors="replace")
        raise TeacherCallError(
            FailureKind.MALFORMED_RESPONSE,
            f"a logprob token's bytes are not a list of byte values: {quote(sent)}",
        ) from None
    return None if piece is None or REPLACEMENT_BYTES in piece else piece


def _id_of(entry: Alternative, vocabulary: TokenVocabulary) -> tuple[int | None, bytes | None]:
    """(the id the server's bytes or text name, the bytes when they are trusted)."""
    piece = _trusted_bytes(entry.bytes)
    if piece is not None:
        return vocabulary.id_of_bytes(piece), piece
    return vocabulary.id_of_text(entry.token), None


def _sampled_ids(
    content: Sequence[Position], text: str, vocabulary: TokenVocabulary
) -> tuple[np.ndarray, TokenIdSource]:
    found = [_id_of(position, vocabulary) for position in content]
    if all(token_id is not None and piece is not None for token_id, piece in found):
        return np.array([token_id for token_id, _ in found], dtype=np.int64), TokenIdSource.BYTES
    return _aligned_ids(content, found, text, vocabulary), TokenIdSource.RETOKENIZED


def _aligned_ids(
    content: Sequence[Position],
    found: list[tuple[int | None, bytes | None]],
    text: str,
    vocabulary: TokenVocabulary,
) -> np.ndarray:
    """The generated ids, walking the answer's bytes: a known id must spell the bytes at the offset it
    reaches; an unknown one is the re-tokenised token that starts at that offset, if it has the bytes
    the server sent, or when it sent none, if the server's text can be that token's."""
    answer = text.encode()
    retokenized = vocabulary.encode(text)
    starts, offset = [], 0
    for token_id in retokenized:
        starts.append(offset)
        offset += len(vocabulary.bytes_of(token_id) or b"")
    ids: list[int] = []
    cursor = next_token = 0
    for step, (position, (token_id, sent_bytes)) in enumerate(zip(content, found, strict=True)):
        if token_id is not None:
            piece = vocabulary.bytes_of(token_id) or b""
            if answer[cursor : cursor + len(piece)] == piece:
                cursor += len(piece)
            elif token_id not in vocabulary.special_ids:  # a stop or control token may be left out
                raise _unmappable(
                    step, position, f"the answer does not continue with its text at byte {cursor}"
                )
            ids.append(token_id)
            continue
        while next_token < len(starts) and starts[next_token] < cursor:
            next_token += 1
        if next_token == len(starts) or starts[next_token] != cursor:
            raise _unmappable(step, position, f"re-tokenising the answer puts no token at byte {cursor}")
        candidate = retokenized[next_token]
        if sent_bytes is not None and vocabulary.bytes_of(candidate) != sent_bytes:
            raise _unmappable(step, position, "no token of the tokenizer has the bytes the server sent")
        if sent_bytes is None and not vocabulary.could_be_written_as(candidate, position.token):
            raise _unmappable(
                step, position, f"the re-tokenised token there ({candidate}) cannot be written as that text"
            )
        ids.append(candidate)
        cursor += len(vocabulary.bytes_of(candidate) or b"")
    if cursor != len(answer):
        raise TeacherCallError(
            FailureKind.UNMAPPABLE_TOKEN,
            f"the generated tokens spell {cursor} bytes of an answer of {len(answer)}: the answer text is "
            "not the generated tokens; is the tokenizer the teacher model's?",
        )
    return np.array(ids, dtype=np.int64)


def _alternative_ids(
    content: Sequence[Position], sampled: np.ndarray, vocabulary: TokenVocabulary
) -> np.ndarray:
    ids: list[int] = []
    for step, position in enumerate(content):
        listed_again = [
            entry.token == position.token and entry.logprob == position.logprob
            for entry in position.top_logprobs
        ]
        for entry, is_sampled in zip(position.top_logprobs, listed_again, strict=True):
            token_id, _ = _id_of(entry, vocabulary)
            if token_id is None and is_sampled and sum(listed_again) == 1:
                token_id = int(sampled[step])
            ids.append(MASKED_ID if token_id is None else token_id)
    return np.array(ids, dtype=np.int64)


def _unmappable(step: int, position: Position, why: str) -> TeacherCallError:
    return TeacherCallError(
        FailureKind.UNMAPPABLE_TOKEN,
        f"generated token {step} ({quote(position.token)}, bytes {bytes(position.bytes).decode()}) has no "
        f"known id: {why}; is the tokenizer the teacher model's?",
    )


# --- the layout --------------------------------------------------------------------------------


def _top_k(
    rows: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, steps: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """[steps, k] ids and logprobs: each row's known alternatives, merged by id, most likely first
    (lower id first among equals), then masked slots."""
    topk_ids = np.full((steps, k), MASKED_ID, dtype=np.int64)
    topk_logprobs = np.full((steps, k), LOGPROB_FLOOR, dtype=np.float64)
    known = ids != MASKED_ID
    rows, ids, logprobs = rows[known], ids[known], np.minimum(logprobs[known], 0.0)
    if rows.size == 0 or k == 0:
        return topk_ids, topk_logprobs
    order = np.lexsort((logprobs, ids, rows))
    rows, ids, logprobs = rows[order], ids[order], logprobs[order]
    same_id = np.zeros(rows.size, dtype=bool)
    same_id[1:] = (rows[1:] == rows[:-1]) & (ids[1:] == ids[:-1])
    repeated = same_id.copy()
    repeated[1:] &= logprobs[1:] == logprobs[:-1]
    rows, ids, logprobs, same_id = rows[~repeated], ids[~repeated], logprobs[~repeated], same_id[~repeated]
    groups = np.flatnonzero(~same_id)
    merged = np.minimum(np.logaddexp.reduceat(logprobs, groups), 0.0)
    rows, ids = rows[groups], ids[groups]
    order = np.lexsort((ids, -merged, rows))
    rows, ids, merged = rows[order], ids[order], merged[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
    kept = rank < k
    topk_ids[rows[kept], rank[kept]] = ids[kept]
    topk_logprobs[rows[kept], rank[kept]] = np.maximum(merged[kept], LOGPROB_FLOOR)
    return topk_ids, topk_logprobs


# Longest piece of a server's text quoted back in an error message.
QUOTE_LIMIT = 300


def quote(text: str) -> str:
    """`text` as an error message quotes it: whitespace runs as one space (kept when that is all there
    is), cut at `QUOTE_LIMIT` characters."""
    text = " ".join(text.split()) or text
    return repr(text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "...")
