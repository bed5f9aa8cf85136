"""A teacher behind any OpenAI-compatible HTTP API: OpenAI, DeepSeek, vLLM, SGLang, TGI, llama.cpp server.

One `httpx.AsyncClient` per backend, its keep-alive pool sized to the concurrency the caller allows,
so that connections are reused across calls (a TLS handshake per call would cost more than the call's
JSON). The wire format itself lives in `openai_wire`; this module only sends, reads the response
(within `openai_wire.response_byte_limit`, as it arrives) and maps failures.

Logprob tokens must become token ids for the sparse layout (see `openai_capture`):
- ``token_ids="server"``: send vLLM's ``return_tokens_as_token_ids`` extension and read ``token_id:N``
  (vLLM; a server that ignores it fails the call with MALFORMED_RESPONSE, naming the fix);
- ``token_ids="tokenizer"``: read them through the teacher's vocabulary (`TokenVocabulary`): from each
  token's `bytes` when the server sends them, else by re-tokenising the answer (any server);
- ``token_ids="auto"`` (default): the tokenizer when one is given, else the server.
With server ids, a vocabulary given as well supplies the end-of-sequence label when the server leaves
the stop token out.
"""

from __future__ import annotations

import time
from typing import Literal

import httpx
import msgspec

from stillhouse.teacher.backends import openai_wire
from stillhouse.teacher.backends.base import TeacherBackend
from stillhouse.teacher.backends.egress_transport import EgressCheckedTransport
from stillhouse.teacher.calls import FailureKind, TeacherAnswer, TeacherCall, TeacherCallError
from stillhouse.teacher.egress import EgressPolicy, EgressRefused
from stillhouse.teacher.token_vocabulary import TokenVocabulary

TokenIdOption = Literal["auto", "server", "tokenizer"]

_encoder = msgspec.json.Encoder()


class OpenAICompatibleBackend(TeacherBackend):
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        max_connections: int = 64,
        timeout_seconds: float = 120.0,
        token_ids: TokenIdOption = "auto",
        tokenizer: TokenVocabulary | None = None,
        egress: EgressPolicy | None = None,
    ) -> None:
        """`base_url` is the API root (``https://api.openai.com/v1``, ``http://vllm:8000/v1``).
        `timeout_seconds` bounds connecting and each wait for the server's next bytes; waiting for a
        free pooled connection is not bounded (callers bound concurrency instead). With `egress`, every
        connection goes only where that policy allows (see `egress_transport`); without, anywhere."""
        parsed = httpx.URL(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(
                f"base_url must be an http(s) URL such as https://api.openai.com/v1; got {base_url!r}"
            )
        if token_ids == "auto":
            token_ids = "tokenizer" if tokenizer is not None else "server"
        if token_ids == "tokenizer" and tokenizer is None:
            raise ValueError(
                "token_ids='tokenizer' needs the teacher's tokenizer vocabulary to turn logprob tokens "
                "into ids; pass one, or use token_ids='server' with a vLLM server"
            )
        if token_ids not in ("server", "tokenizer"):
            raise ValueError(f"token_ids must be 'auto', 'server' or 'tokenizer'; got {token_ids!r}")
        self.base_url = base_url.rstrip("/")
        self.token_ids: TokenIdOption = token_ids
        self._url = f"{self.base_url}/chat/completions"
        self._vocabulary = tokenizer
        self._api_key = api_key or None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_seconds, pool=None),
            limits=limits,
            transport=None if egress is None else EgressCheckedTransport(egress, limits=limits),
        )

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend({self.base_url!r}, token_ids={self.token_ids!r})"

    async def answer(self, call: TeacherCall) -> TeacherAnswer:
        if call.base_url.rstrip("/") != self.base_url:
            raise ValueError(f"a call for {call.base_url} was sent to the backend for {self.base_url}")
        body = _encoder.encode(
            openai_wire.chat_request(call, token_ids_from_server=self.token_ids == "server")
        )
        limit = openai_wire.response_byte_limit(call)
        started = time.perf_counter()
        try:
            async with self._client.stream("POST", self._url, content=body) as response:
                content = await self._read_body(response, call, limit)
        except httpx.ConnectTimeout:
            raise self._scrubbed(
                TeacherCallError(
                    FailureKind.UNREACHABLE, f"cannot reach {self.base_url}: connecting timed out"
                )
            ) from None
        except httpx.TimeoutException as error:
            raise self._scrubbed(
                TeacherCallError(
                    FailureKind.TIMEOUT, f"{self.base_url} did not answer in time ({type(error).__name__})"
                )
            ) from None
        except httpx.ConnectError as error:
            raise self._scrubbed(
                TeacherCallError(FailureKind.UNREACHABLE, f"cannot reach {self.base_url}: {error}")
            ) from None
        except EgressRefused as refused:
            raise TeacherCallError(FailureKind.EGRESS_REFUSED, str(refused)) from None
        except httpx.TransportError as error:
            raise self._scrubbed(
                TeacherCallError(
                    FailureKind.SERVER_ERROR,
                    f"the connection to {self.base_url} broke: {type(error).__name__}: {error}",
                )
            ) from None
        latency = time.perf_counter() - started
        if response.status_code != 200:
            raise self._scrubbed(
                openai_wire.error_from_response(
                    response.status_code, response.headers, content, model=call.model, url=self._url
                )
            )
        try:
            return openai_wire.parse_chat_completion(
                content,
                call,
                self._vocabulary,
                ids_from_server=self.token_ids == "server",
                latency_seconds=latency,
            )
        except TeacherCallError as error:
            raise self._scrubbed(error) from None

    async def _read_body(self, response: httpx.Response, call: TeacherCall, limit: int) -> bytes:
        """The body, read as it arrives and refused once it is known to be over `limit` bytes: from its
        Content-Length before reading, else on the chunk that crosses the limit."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise openai_wire.response_too_large(self._url, call, limit, declared=int(declared))
        body = bytearray()
        async for chunk in response.aiter_bytes():  # decompressed: the limit bounds what memory holds
            body += chunk
            if len(body) > limit:
                raise openai_wire.response_too_large(self._url, call, limit)
        return bytes(body)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _scrubbed(self, error: TeacherCallError) -> TeacherCallError:
        """`error` without the API key, should a server have echoed it back in a message."""
        if not self._api_key or self._api_key not in error.message:
            return error
        return TeacherCallError(
            error.kind, error.message.replace(self._api_key, "<api key>"), retry_after=error.retry_after
        )
