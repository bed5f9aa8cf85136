"""A teacher tokenizer's vocabulary as servers describe tokens: by their bytes, or by their text.

OpenAI-compatible servers name a logprob token by its text and, often, its UTF-8 `bytes`; neither is a
vocabulary key. A byte-level BPE vocabulary (GPT-2, Llama 3, Qwen, SmolLM) spells its keys in GPT-2's
byte-to-unicode alphabet ("Ġthe" is b" the"); a SentencePiece vocabulary writes a space as "▁" and a
byte-fallback token as "<0xE6>". `TokenVocabulary` turns every id into the bytes it stands for, and
answers the two questions capture asks:

- which id has exactly these bytes (`id_of_bytes`);
- which id a server could have written as this text (`id_of_text`). Servers decode a token's bytes to
  text strictly, or dropping (llama.cpp) or replacing (vLLM, SGLang) the bytes of a partial UTF-8
  character, so a text stands for every id that any of the three decodings turns into it.

Both answer None unless exactly one id fits: a token is never guessed among several.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# U+FFFD in UTF-8: a server that re-encodes lossy token text sends these bytes for a partial character.
REPLACEMENT_BYTES = "\ufffd".encode()
_AMBIGUOUS = -1


def gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte, to that byte.
    Printable Latin-1 bytes stand for themselves; the others are shifted to code points from 256 up."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shift)
            shift += 1
    return {chr(character): byte for byte, character in zip(printable, characters, strict=True)}


def _decodings(piece: bytes) -> set[str]:
    """Every text a server may write for a token of these bytes."""
    return {piece.decode("utf-8", errors="ignore"), piece.decode("utf-8", errors="replace")}


@dataclass
class TokenVocabulary:
    """`token_bytes[i]`: the bytes of token i (None for an id that stands for no bytes). `encode`
    re-tokenises text the way the teacher does (no special tokens added)."""

    token_bytes: Sequence[bytes | None]
    encode: Callable[[str], list[int]]
    eos_id: int | None = None
    special_ids: frozenset[int] = frozenset()
    _by_bytes: dict[bytes, int] = field(init=False, repr=False)
    _by_text: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_bytes, self._by_text = {}, {}
        for token_id, piece in enumerate(self.token_bytes):
            if piece is None:
                continue
            _add(self._by_bytes, piece, token_id)
            for text in _decodings(piece):
                _add(self._by_text, text, token_id)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenVocabulary:
        """The vocabulary of a Hugging Face tokenizer (fast or slow)."""
        vocabulary = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocabulary.values()) + 1)
        token_bytes: list[bytes | None] = [None] * size
        added = set(tokenizer.get_added_vocab())
        to_bytes = _key_to_bytes(tokenizer)
        for key, token_id in vocabulary.items():
            token_bytes[token_id] = key.encode() if key in added else to_bytes(key)
        return cls(
            token_bytes=token_bytes,
            encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
            eos_id=tokenizer.eos_token_id,
            special_ids=frozenset(tokenizer.all_special_ids),
        )

    def id_of_bytes(self, piece: bytes) -> int | None:
        found = self._by_bytes.get(piece, _AMBIGUOUS)
        return None if found == _AMBIGUOUS else found

    def id_of_text(self, text: str) -> int | None:
        found = self._by_text.get(text, _AMBIGUOUS)
        return None if found == _AMBIGUOUS else found

    def could_be_written_as(self, token_id: int, text: str) -> bool:
        """Whether a server could have written token `token_id` as `text`."""
        piece = self.bytes_of(token_id)
        return piece is not None and text in _decodings(piece)

    def bytes_of(self, token_id: int) -> bytes | None:
        return self.token_bytes[token_id] if 0 <= token_id < len(self.token_bytes) else None


def _add(table: dict, key: Any, token_id: int) -> None:
    table[key] = token_id if table.get(key, token_id) == token_id else _AMBIGUOUS


def _key_to_bytes(tokenizer: Any) -> Callable[[str], bytes | None]:
    """How a vocabulary key of this tokenizer spells bytes: GPT-2's alphabet for byte-level BPE, else
    SentencePiece's "▁" and "<0xNN>"."""
    if _is_byte_level(tokenizer):
        alphabet = gpt2_unicode_to_byte()

        def byte_level(key: str) -> bytes | None:
            try:
                return bytes(alphabet[character] for character in key)
            except KeyError:  # not spelled in the byte alphabet: no bytes we can vouch for
                return None

        return byte_level

    def sentencepiece(key: str) -> bytes:
        if len(key) == 6 and key.startswith("<0x") and key.endswith(">"):
            try:
                return bytes([int(key[3:5], 16)])
            except ValueError:
                pass
        return key.replace("\u2581", " ").encode()

    return sentencepiece


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: GPT-2's keeps its byte alphabet as `byte_decoder`
        return hasattr(tokenizer, "byte_decoder")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)
