"""Where a field of a job spec's text sits (`spec_lines`): found in YAML and JSON alike, the parent's line
for a missing field, and no line (never an error) for text that cannot be read."""

from __future__ import annotations

import json
import time

import pytest

from stillhouse.control_plane.spec_lines import field_lines

SPEC = """\
apiVersion: stillhouse.dev/v1
metadata:
  labels: {team.name: support}
spec:
  teacher: {backend: local, model: smollm2}
  student:
    init:
      config: {}
  prompts:
    sources:
      - inline: [hello]
      - path: /data/seeds.jsonl
        column: text
"""


@pytest.mark.parametrize(
    ("field", "line"),
    [
        ("apiVersion", 1),
        ("spec.teacher.model", 5),
        ("spec.student.init.config", 8),
        ("spec.prompts.sources[1].path", 12),
        ("spec.prompts.sources[1].column", 13),
        ("spec.prompts.sources[0]", 11),
        # Missing: the line of the mapping that should hold it.
        ("spec.student.init.pretrained", 7),
        ("spec.training", 4),
        ("kind", 1),
        ("spec.prompts.sources[7].path", 10),
        # A key with a dot in it, as a label's may have.
        ("metadata.labels.team.name", 3),
        ("(body)", 1),
    ],
)
def test_each_field_is_found_on_its_line(field, line):
    assert field_lines(SPEC)(field) == line


def test_json_is_read_as_yaml():
    text = json.dumps({"spec": {"teacher": {"model": "m"}, "training": {"epochs": 0}}}, indent=2)
    lines = field_lines(text)
    assert (lines("spec.teacher.model"), lines("spec.training.epochs"), lines("spec.student")) == (4, 7, 2)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "spec: [unclosed",
        "a: 1\n---\nb: 2",
        "&a [*a]",
        "- " * 100_000 + "x",
        "[" * 100_000 + "]" * 100_000,
        "{a: " * 100_000,
        "\x00\xff",
        "!!python/object:os.system {}",
    ],
)
def test_text_that_cannot_be_read_has_no_lines_and_raises_nothing(text):
    lines = field_lines(text)
    assert lines("spec.teacher") in (None, 1)
    assert lines("[0]" * 100 + ".x" * 100) in (None, 1)


def test_a_large_text_is_read_quickly():
    text = json.dumps({"spec": {"prompts": {"sources": [{"inline": ["x" * 50] * 1000}] * 18}}})
    started = time.monotonic()
    assert field_lines(text)("spec.prompts.sources[17].inline[999]") == 1
    assert time.monotonic() - started < 1
