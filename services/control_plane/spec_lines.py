"""Where a field of a submitted job spec sits in its text: the 1-based line of the field named by a path
such as `spec.prompts.sources[0].path` (as field errors name fields), so that an editor can point at it.

The text is read as a stream of YAML parser events, which carry their positions; JSON is read the same
way, as YAML. The events build a light tree of lines without recursion (PyYAML's composer recurses, in C
with libyaml, where a deeply nested text would crash the process rather than raise), using libyaml when
it is there (a 1 MiB body takes milliseconds, not a second). A field the text does not hold (a required
one that is missing) is placed at the line of the mapping that should hold it. Nothing here raises: text
that cannot be read, or that is nested deeper than a body may be, has no lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from stillhouse.control_plane.spec_body import MAX_DEPTH

_PARSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A path part: `.name`, or `[index]`.
_PART = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")
# Paths are made by the API from a validation error's location, so they are short; this only bounds work.
MAX_PATH_PARTS = 64

FieldLines = Callable[[str], int | None]


@dataclass
class _Node:
    line: int
    # A mapping's values by key (with the key's line); a sequence's items.
    entries: dict[str, tuple[int, _Node]] = field(default_factory=dict)
    items: list[_Node] = field(default_factory=list)
    is_mapping: bool = False
    is_sequence: bool = False
    # In a mapping: the key just read (its scalar value or None, and its line), waiting for its value.
    pending_key: tuple[str | None, int] | None = None


def field_lines(text: str) -> FieldLines:
    """A function from a field's path to its line in `text` (None where it cannot be told)."""
    try:
        root = _tree(text)
    except Exception:  # any text at all may come here: no lines is the answer to what cannot be read
        root = None
    if root is None:
        return lambda _path: None
    document = root

    def line_of(path: str) -> int | None:
        try:
            return _line_of(document, _parts(path))
        except Exception:
            return None

    return line_of


def _tree(text: str) -> _Node | None:
    """The first document of `text` as a tree of lines."""
    root: _Node | None = None
    open_nodes: list[_Node] = []
    for event in yaml.parse(text, Loader=_PARSER):
        if isinstance(event, yaml.CollectionEndEvent):
            open_nodes.pop()
            if not open_nodes:
                return root
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        node = _Node(
            event.start_mark.line + 1,
            is_mapping=isinstance(event, yaml.MappingStartEvent),
            is_sequence=isinstance(event, yaml.SequenceStartEvent),
        )
        if open_nodes:
            _attach(open_nodes[-1], node, event.value if isinstance(event, yaml.ScalarEvent) else None)
        else:
            root = node
        if node.is_mapping or node.is_sequence:
            open_nodes.append(node)
            if len(open_nodes) > MAX_DEPTH:
                return None  # deeper than any body the API reads: and libyaml is slow on deep flow nesting
        elif not open_nodes:
            return root
    return root


def _attach(parent: _Node, node: _Node, scalar: str | None) -> None:
    if parent.is_sequence:
        parent.items.append(node)
    elif parent.pending_key is None:
        parent.pending_key = (scalar, node.line)
    else:
        name, key_line = parent.pending_key
        parent.pending_key = None
        if name is not None:
            parent.entries[name] = (key_line, node)  # the last of duplicate keys, as a parser keeps


def _parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for match in _PART.finditer(path):
        index, name = match.groups()
        parts.append(int(index) if index is not None else name)
        if len(parts) > MAX_PATH_PARTS:
            break
    return parts


def _line_of(root: _Node, parts: list[str | int]) -> int:
    """The line of the deepest node that `parts` lead to: a part the text does not hold (a missing field,
    or a part of the location that is the schema's, not the document's) is passed over."""
    node, line = root, root.line
    position = 0
    while position < len(parts):
        found = _child(node, parts, position)
        if found is None:
            position += 1
            continue
        node, line, used = found
        position += used
    return line


def _child(node: _Node, parts: list[str | int], position: int) -> tuple[_Node, int, int] | None:
    """The node that `parts[position:]` name within `node`, its line, and how many parts named it (a
    mapping key may itself hold dots, as a label's name may)."""
    part = parts[position]
    if node.is_sequence and isinstance(part, int):
        if part < len(node.items):
            item = node.items[part]
            return item, item.line, 1
        return None
    if not node.is_mapping or not isinstance(part, str):
        return None
    # The longest dotted run of names that is a key wins.
    for count in range(len(parts) - position, 0, -1):
        run = parts[position : position + count]
        if any(isinstance(name, int) for name in run):
            continue
        entry = node.entries.get(".".join(str(name) for name in run))
        if entry is not None:
            key_line, value = entry
            return value, key_line, count
    return None
