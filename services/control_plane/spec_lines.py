"""Where a field of a submitted job spec sits in its text: the 1-based line of the field named by a path
such as `spec.prompts.sources[0].path` (as field errors name fields), so that an editor can point at it.

The text is composed (not constructed) with PyYAML, which keeps each node's position; JSON is read the
same way, as YAML. A field the text does not hold (a required one that is missing) is placed at the line
of the mapping that should hold it. Nothing here raises: text that cannot be composed has no lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import yaml

# A path part: `.name`, or `[index]`.
_PART = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")
# Paths are made by the API from a validation error's location, so they are short; this only bounds work.
MAX_PATH_PARTS = 64

FieldLines = Callable[[str], int | None]


def field_lines(text: str) -> FieldLines:
    """A function from a field's path to its line in `text` (None where it cannot be told)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # any text at all may come here: no lines is the answer to what cannot be read
        return lambda _path: None
    if root is None:
        return lambda _path: None

    def line_of(path: str) -> int | None:
        try:
            return _line_of(root, _parts(path))
        except Exception:
            return None

    return line_of


def _parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for match in _PART.finditer(path):
        index, name = match.groups()
        parts.append(int(index) if index is not None else name)
        if len(parts) > MAX_PATH_PARTS:
            break
    return parts


def _line_of(root: yaml.Node, parts: list[str | int]) -> int:
    """The line of the deepest node that `parts` lead to: a part the text does not hold (a missing field,
    or a part of the location that is the schema's, not the document's) is passed over."""
    node, line = root, root.start_mark.line + 1
    position = 0
    while position < len(parts):
        found = _child(node, parts, position)
        if found is None:
            position += 1
            continue
        node, line, used = found
        position += used
    return line


def _child(node: yaml.Node, parts: list[str | int], position: int) -> tuple[yaml.Node, int, int] | None:
    """The node that `parts[position:]` name within `node`, its line, and how many parts named it (a
    mapping key may itself hold dots, as a label's name may)."""
    part = parts[position]
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        if part < len(node.value):
            item = node.value[part]
            return item, item.start_mark.line + 1, 1
        return None
    if not isinstance(node, yaml.MappingNode) or not isinstance(part, str):
        return None
    names = [str(name) for name in parts[position:]]
    # The longest dotted run of parts that is a key wins; the last of duplicate keys, as a parser keeps.
    for count in range(len(names), 0, -1):
        if any(isinstance(later, int) for later in parts[position : position + count]):
            continue
        name = ".".join(names[:count])
        for key, value in reversed(node.value):
            if isinstance(key, yaml.ScalarNode) and key.value == name:
                return value, key.start_mark.line + 1, count
    return None
