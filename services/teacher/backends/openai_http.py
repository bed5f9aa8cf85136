"""A teacher behind any OpenAI-compatible HTTP API: OpenAI, DeepSeek, vLLM, SGLang, TGI, llama.cpp server.

One `aiohttp.ClientSession` per backend, its keep-alive pool sized to the concurrency the caller allows,
so that connections are reused across calls (a TLS handshake per call would cost more than the call's
JSON). aiohttp, not httpx: its HTTP parser is C, and a ~110 KB answer with top-20 logprobs costs the
client a quarter of the CPU through it (bench/scale_client_cpu.py), which is what caps the answers one
process can take in a second. The wire format itself lives in `openai_wire`; this module only sends,
reads the response (within `openai_wire.response_byte_limit`, as it arrives) and maps failures.

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

import aiohttp
import httpx
import msgspec
import yarl

from stillhouse.teacher.backends import openai_wire
from stillhouse.teacher.backends.base import TeacherBackend
from stillhouse.teacher.backends.egress_connector import EgressCheckedConnector
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
        connection goes only where that policy allows (see `egress_connector`); without, anywhere."""
        parsed = yarl.URL(base_url)
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
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout_seconds, sock_read=timeout_seconds
        )
        self._egress = egress
        # Made on the first call: an aiohttp session belongs to the event loop it is made in.
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend({self.base_url!r}, token_ids={self.token_ids!r})"

    def _open_session(self) -> aiohttp.ClientSession:
        options = {
            "limit": self._max_connections,
            # httpx's trust store rule, not aiohttp's (the system store): certifi's bundle, unless
            # SSL_CERT_FILE or SSL_CERT_DIR names another.
            "ssl": httpx.create_ssl_context(),
        }
        connector = (
            aiohttp.TCPConnector(**options)
            if self._egress is None
            else EgressCheckedConnector(self._egress, **options)
        )
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=self._timeout, trust_env=False
        )
        return self._session

    async def answer(self, call: TeacherCall) -> TeacherAnswer:
        if call.base_url.rstrip("/") != self.base_url:
            raise ValueError(f"a call for {call.base_url} was sent to the backend for {self.base_url}")
        body = _encoder.encode(
            openai_wire.chat_request(call, token_ids_from_server=self.token_ids == "server")
        )
        limit = openai_wire.response_byte_limit(call)
        session = self._session or self._open_session()
        started = time.perf_counter()
        try:
            async with session.post(self._url, data=body, allow_redirects=False) as response:
                content = await self._read_body(response, call, limit)
        except aiohttp.ConnectionTimeoutError:
            raise self._scrubbed(
                TeacherCallError(
                    FailureKind.UNREACHABLE, f"cannot reach {self.base_url}: connecting timed out"
                )
            ) from None
        except TimeoutError as error:  # aiohttp's read timeouts are TimeoutErrors too
            raise self._scrubbed(
                TeacherCallError(
                    FailureKind.TIMEOUT, f"{self.base_url} did not answer in time ({type(error).__name__})"
                )
            ) from None
        except aiohttp.ClientConnectorError as error:
            raise self._scrubbed(
                TeacherCallError(FailureKind.UNREACHABLE, f"cannot reach {self.base_url}: {error}")
            ) from None
        except EgressRefused as refused:
            raise TeacherCallError(FailureKind.EGRESS_REFUSED, str(refused)) from None
        except aiohttp.ClientError as error:
            raise self._scrubbed(
                TeacherCallError(
                    FailureKind.SERVER_ERROR,
                    f"the connection to {self.base_url} broke: {type(error).__name__}: {error}",
                )
            ) from None
        latency = time.perf_counter() - started
        if response.status != 200:
            raise self._scrubbed(
                openai_wire.error_from_response(
                    response.status, response.headers, content, model=call.model, url=self._url
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

    async def _read_body(self, response: aiohttp.ClientResponse, call: TeacherCall, limit: int) -> bytes:
        """The body, read as it arrives and refused once it is known to be over `limit` bytes: from its
        Content-Length before reading, else on the chunk that crosses the limit. Chunks are joined once,
        at the end."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise openai_wire.response_too_large(self._url, call, limit, declared=int(declared))
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():  # decompressed: the limit bounds what memory holds
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise openai_wire.response_too_large(self._url, call, limit)
        return b"".join(chunks)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _scrubbed(self, error: TeacherCallError) -> TeacherCallError:
        """`error` without the API key, should a server have echoed it back in a message."""
        if not self._api_key or self._api_key not in error.message:
            return error
        return TeacherCallError(
            error.kind, error.message.replace(self._api_key, "<api key>"), retry_after=error.retry_after
        )
