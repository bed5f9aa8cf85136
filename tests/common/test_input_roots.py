"""Local inputs are read from the input roots only: resolved first, so `..` and links cannot leave one."""

from __future__ import annotations

import pytest

from stillhouse.common.input_roots import NO_LOCAL_FILES, InputRefused, InputRoots, check_prompt_inputs
from stillhouse.common.jobspec import PromptsSpec

FIELD = "spec.prompts.sources[0].path"


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "inputs"
    (folder / "team").mkdir(parents=True)
    (folder / "team" / "seeds.jsonl").write_text("{}\n")
    (tmp_path / "secret.txt").write_text("hunter2\n")
    return folder


def refusal(roots: InputRoots, path: str) -> str:
    with pytest.raises(InputRefused) as raised:
        roots.confine(path, FIELD)
    assert raised.value.field == FIELD
    return raised.value.message


def test_a_file_inside_a_root_is_given_back_resolved(root):
    roots = InputRoots.of([root])
    assert roots.confine(f"{root}/team/./seeds.jsonl", FIELD) == root / "team" / "seeds.jsonl"
    assert roots.confine(f"{root}/team/../team/seeds.jsonl", FIELD) == root / "team" / "seeds.jsonl"


def test_dot_dot_links_relative_and_home_paths_are_refused(root, tmp_path):
    roots = InputRoots.of([root])
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "etc").symlink_to("/etc")
    assert "outside the input roots" in refusal(roots, f"{root}/../secret.txt")
    assert "outside the input roots" in refusal(roots, f"{root}/escape")
    assert "outside the input roots" in refusal(roots, f"{root}/etc/passwd")
    assert "outside the input roots" in refusal(roots, "/etc/passwd")
    assert "not an absolute path" in refusal(roots, "team/seeds.jsonl")
    assert "not an absolute path" in refusal(roots, "~/.ssh/id_rsa")
    # A folder whose name starts like a root's is not inside it.
    sibling = root.parent / (root.name + "-other")
    sibling.mkdir()
    assert "outside the input roots" in refusal(roots, f"{sibling}/x.jsonl")


def test_a_root_given_through_a_link_still_holds_its_files(root, tmp_path):
    (tmp_path / "link-to-inputs").symlink_to(root)
    roots = InputRoots.of([tmp_path / "link-to-inputs"])
    assert roots.confine(f"{root}/team/seeds.jsonl", FIELD) == root / "team" / "seeds.jsonl"


def test_without_roots_no_local_file_is_read(root):
    message = refusal(NO_LOCAL_FILES, f"{root}/team/seeds.jsonl")
    assert "reads no local files" in message and "s3://" in message


def test_the_refusal_names_the_field_of_sources_and_slot_files(root):
    prompts = PromptsSpec.model_validate(
        {
            "sources": [{"path": "s3://stillhouse/seeds.jsonl"}, {"path": f"{root}/team/seeds.jsonl"}],
            "generate": {
                "strategy": "template",
                "count": 1,
                "template": "{{ x }}",
                "slotFiles": {"x": "/etc/hosts"},
            },
        }
    )
    with pytest.raises(InputRefused) as raised:
        check_prompt_inputs(prompts, InputRoots.of([root]))
    assert raised.value.field == "spec.prompts.generate.slotFiles.x"
    with pytest.raises(InputRefused) as raised:
        check_prompt_inputs(prompts, NO_LOCAL_FILES)
    assert raised.value.field == "spec.prompts.sources[1].path"
