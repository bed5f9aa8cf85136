"""Hostile job specs against a real control plane process: each gets a clear 4xx naming what was refused,
never a 5xx, a hang, or a quote of a file it should not read."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import yaml

from stillhouse.control_plane.spec_body import MAX_DEPTH, MAX_EXPANDED_VALUES, MAX_SPEC_BYTES

MINIMAL = {"spec": {"teacher": {"backend": "local", "model": "smollm2"}, "student": {"init": {"config": {}}}}}
YAML = {"Content-Type": "application/yaml"}


def with_prompts(prompts: dict) -> dict:
    document = json.loads(json.dumps(MINIMAL))
    document["spec"]["prompts"] = prompts
    return document


# --- the body ---------------------------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    """A small YAML spec whose aliases name one list 10^levels times."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    lines.append(
        "spec: {teacher: {backend: local, model: smollm2}, student: {init: {config: {}}}, "
        f"prompts: {{sources: [{{inline: *l{levels - 1}}}]}}}}"
    )
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("content", "content_type", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, "application/json", f"nested more than {MAX_DEPTH}"),
        ('{"spec": ' * 70 + "1" + "}" * 70, "application/json", f"nested more than {MAX_DEPTH}"),
        ("- " * 100_000 + "x", "application/yaml", f"nested more than {MAX_DEPTH}"),
        (billion_laughs(), "application/yaml", f"more than {MAX_EXPANDED_VALUES} values"),
        ("&a [*a]", "application/yaml", "contains itself"),
    ],
    ids=["json-100k-brackets", "json-70-objects", "yaml-100k-deep", "yaml-billion-laughs", "yaml-recursive"],
)
def test_inflating_bodies_get_400(api, content, content_type, words):
    with api.client() as client:
        response = client.post("/v1/jobs", content=content, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert words in response.json()["message"]


def test_a_streamed_body_is_cut_off_at_the_cap(api):
    """Without a Content-Length the body arrives in chunks; the API stops reading at the cap (413)."""

    def chunks() -> Iterator[bytes]:
        for _ in range(4 * MAX_SPEC_BYTES // 65536):
            yield b" " * 65536

    with api.client() as client:
        response = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert f"at most {MAX_SPEC_BYTES} bytes" in response.json()["message"]


# --- numbers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_value", "field"),
    [
        ("{training: {learningRate: .inf}}", "spec.training.learningRate"),
        ("{training: {learningRate: .nan}}", "spec.training.learningRate"),
        ("{training: {epochs: 1000000}}", "spec.training.epochs"),
        ("{training: {batchTokens: 100000000000}}", "spec.training.batchTokens"),
        ("{prompts: {generate: {count: 1000000000000}}}", "spec.prompts.generate.count"),
        ("{teacher: {backend: local, model: m, limits: {timeoutSeconds: .inf}}}", "spec.teacher.limits"),
        ("{prompts: {seed: -1}}", "spec.prompts.seed"),
    ],
)
def test_unbounded_or_infinite_numbers_get_422(api, yaml_value, field):
    document = deep_merge(json.loads(json.dumps(MINIMAL)), {"spec": yaml.safe_load(yaml_value)})
    with api.client() as client:
        response = client.post("/v1/jobs", content=yaml.safe_dump(document), headers=YAML)
    assert response.status_code == 422, response.text
    fields = [error["field"] for error in response.json()["errors"]]
    assert any(name.startswith(field) for name in fields), fields


def deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


# --- local files ----------------------------------------------------------------------------------


def refused_field(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    return error["field"]


@pytest.mark.parametrize(
    ("prompts", "field"),
    [
        ({"sources": [{"path": "/etc/passwd"}]}, "spec.prompts.sources[0].path"),
        ({"sources": [{"path": "/proc/self/environ", "format": "csv"}]}, "spec.prompts.sources[0].path"),
        (
            {
                "generate": {
                    "strategy": "template",
                    "count": 1,
                    "template": "{{ x }}",
                    "slotFiles": {"x": "/etc/hosts"},
                }
            },
            "spec.prompts.generate.slotFiles.x",
        ),
        ({"sources": [{"path": "~/.ssh/id_rsa"}]}, "spec.prompts.sources[0].path"),
        ({"sources": [{"path": "seeds.jsonl"}]}, "spec.prompts.sources[0].path"),
    ],
    ids=["etc-passwd", "proc-environ", "slot-file", "home", "relative"],
)
def test_local_files_outside_the_input_roots_are_refused_without_their_contents(api, prompts, field):
    with api.client() as client:
        response = client.post("/v1/jobs", json=with_prompts(prompts))
    assert refused_field(response) == field
    assert "input roots" in response.json()["message"] or "absolute path" in response.json()["message"]
    assert "root:" not in response.text and "PATH=" not in response.text


def test_dot_dot_and_symlinks_cannot_leave_a_root(api, tmp_path):
    inputs = api.inputs
    link = inputs / f"link-{tmp_path.name}"  # a name of this test's own: the root is the module's
    link.symlink_to("/etc")
    escapes = [f"{inputs}/../../../../etc/passwd", f"{link}/passwd"]
    with api.client() as client:
        for path in escapes:
            response = client.post("/v1/jobs", json=with_prompts({"sources": [{"path": path}]}))
            assert refused_field(response) == "spec.prompts.sources[0].path", path
            assert "outside the input roots" in response.json()["message"]


def test_a_file_inside_a_root_and_an_object_store_path_are_accepted(api, tmp_path):
    seeds = api.inputs / f"team-{tmp_path.name}" / "seeds.jsonl"
    seeds.parent.mkdir()
    seeds.write_text('{"prompt": "hello"}\n')
    prompts = {"sources": [{"path": str(seeds)}, {"path": "s3://stillhouse/seeds/more.jsonl"}]}
    with api.client() as client:
        response = client.post("/v1/jobs", json=with_prompts(prompts))
    assert response.status_code == 201, response.text
