"""Reading a job spec from a request body, with bounds on everything a hostile body could inflate.

- size: the body is read in chunks and refused (413) once it passes `MAX_SPEC_BYTES`, before it is whole;
- depth: a document nested deeper than `MAX_DEPTH` is refused (400), JSON and YAML alike, before the
  parser's own recursion limit turns it into a server error;
- YAML aliases: an alias is a reference, so a small body can name the same list millions of times
  ("billion laughs"). The document's size counted as if every alias were written out is bounded by
  `MAX_EXPANDED_VALUES` (400); a document that contains itself is refused.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import yaml

MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_EXPANDED_VALUES = 200_000
JSON_TYPES = frozenset({"application/json"})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})


class BodyRefused(ValueError):
    """A body the API will not read: `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_capped(chunks: AsyncIterator[bytes], declared_length: str | None) -> bytes:
    """The whole body, refused as soon as its declared or received length passes `MAX_SPEC_BYTES`."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > MAX_SPEC_BYTES:
        raise _too_large(f"{declared_length} bytes")
    received = bytearray()
    async for chunk in chunks:
        received += chunk
        if len(received) > MAX_SPEC_BYTES:
            raise _too_large(f"more than {MAX_SPEC_BYTES} bytes")
    return bytes(received)


def _too_large(size: str) -> BodyRefused:
    return BodyRefused(413, f"the job spec is {size}; at most {MAX_SPEC_BYTES} bytes are accepted")


def parse_document(content_type: str, raw: bytes) -> Any:
    """The JSON or YAML document in `raw`, by the request's Content-Type (JSON when none is given)."""
    media_type = content_type.split(";")[0].strip().lower() or "application/json"
    if media_type in JSON_TYPES:
        try:
            document = json.loads(raw)
        except RecursionError:
            raise _too_deep() from None
        except ValueError as exc:
            raise BodyRefused(400, f"the body is not valid JSON: {exc}") from None
    elif media_type in YAML_TYPES:
        try:
            document = yaml.load(raw, Loader=_BoundedLoader)  # a SafeLoader, see below
        except RecursionError:
            raise _too_deep() from None
        except yaml.YAMLError as exc:
            raise BodyRefused(400, f"the body is not valid YAML: {exc}") from None
    else:
        allowed = ", ".join(sorted(JSON_TYPES | YAML_TYPES))
        raise BodyRefused(415, f"Content-Type {media_type!r} is not accepted; use one of: {allowed}")
    check_expanded_size(document)
    return document


def _too_deep() -> BodyRefused:
    return BodyRefused(400, f"the body is nested more than {MAX_DEPTH} levels deep")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a node nested more than `MAX_DEPTH` levels deep while composing,
    before the constructor recurses into it."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _too_deep()
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def check_expanded_size(document: Any) -> None:
    """Refuse a document deeper than `MAX_DEPTH`, larger than `MAX_EXPANDED_VALUES` values once every
    shared (aliased) part is counted each time it appears, or containing itself."""
    sizes: dict[int, int] = {}  # id of a container -> its expanded size, once known
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(document, 1, False)]
    while stack:
        value, depth, children_done = stack.pop()
        if not isinstance(value, dict | list):
            continue
        key = id(value)
        children = list(value.values()) if isinstance(value, dict) else value
        if children_done:
            on_path.discard(key)
            size = 1 + sum(sizes.get(id(child), 1) for child in children)
            if size > MAX_EXPANDED_VALUES:
                raise BodyRefused(
                    400,
                    f"the body expands to more than {MAX_EXPANDED_VALUES} values (YAML aliases count each "
                    "time they are used)",
                )
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise BodyRefused(400, "the body contains itself (a recursive YAML alias)")
        if depth > MAX_DEPTH:
            raise _too_deep()
        on_path.add(key)
        stack.append((value, depth, True))
        stack.extend((child, depth + 1, False) for child in children)
