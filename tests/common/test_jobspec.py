"""The DistillationJob spec: a minimal spec gets every default, and a bad one is refused naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from stillhouse.common.jobspec import DistillationJob, Precision

MINIMAL = {
    "spec": {
        "teacher": {"backend": "local", "model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "student": {"init": {"pretrained": "s3://stillhouse/models/qwen2.5-0.5b"}},
    }
}

# The example of the design document, as a user would write it, with the teacher's tokenizer named (a
# logit loss with an `openai` teacher needs it).
DESIGN_EXAMPLE = """
apiVersion: stillhouse.dev/v1
kind: DistillationJob
metadata: {name: support-bot-small}
spec:
  prompts: {sources: [{path: s3://stillhouse/seeds/support.jsonl}], generate: {strategy: self_instruct, count: 20000}, seed: 7}
  teacher: {backend: openai, baseURL: https://api.deepseek.com/v1, model: deepseek-chat, apiKeySecret: deepseek,
            tokenizer: /models/tokenizers/deepseek-v3, sampling: {temperature: 0.7, maxTokens: 512}, topLogprobs: 20,
            limits: {requestsPerMinute: 3000, tokensPerMinute: 1000000, maxConcurrency: 256}, budgetUSD: 50}
  student: {init: {pretrained: s3://stillhouse/models/qwen2.5-0.5b}}
  training: {loss: {kind: forward_kl, temperature: 1.0, ceWeight: 0.5}, epochs: 2, learningRate: 2.0e-5,
             workers: 8, gpusPerWorker: 1, strategy: fsdp}
  evaluation: {holdoutFraction: 0.02}
"""  # noqa: E501


def with_changes(path: tuple[str, ...], value: Any, base: dict | None = None) -> dict:
    """A copy of the minimal spec (or `base`) with the value at `path` set (or removed, for ...)."""
    document = copy.deepcopy(base or MINIMAL)
    *parents, last = path
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return document


def refusals(document: dict) -> list[dict]:
    with pytest.raises(ValidationError) as caught:
        DistillationJob.model_validate(document)
    return caught.value.errors()


def refused_at(document: dict, loc: tuple, fragment: str) -> dict:
    """Assert the document is refused with an error at `loc` whose message contains `fragment`."""
    errors = refusals(document)
    matching = [error for error in errors if error["loc"] == loc]
    assert matching, f"no error at {loc}; errors were {[(e['loc'], e['msg']) for e in errors]}"
    assert any(fragment in error["msg"] for error in matching), matching
    return matching[0]


def test_minimal_spec_gets_every_default() -> None:
    job = DistillationJob.model_validate(MINIMAL)
    document = job.to_document()
    assert document["apiVersion"] == "stillhouse.dev/v1"
    assert document["kind"] == "DistillationJob"
    assert document["metadata"] == {"name": None, "labels": {}}
    spec = document["spec"]
    assert spec["prompts"]["sources"] == []
    assert spec["prompts"]["generate"]["strategy"] == "none"
    assert spec["prompts"]["filters"]["dedup"] is True
    assert spec["prompts"]["filters"]["nearDupThreshold"] == 0.8
    assert spec["prompts"]["filters"]["maxChars"] == 8192
    assert spec["teacher"]["topLogprobs"] == 20
    assert spec["teacher"]["baseURL"] is None
    assert spec["teacher"]["sampling"] == {
        "temperature": 0.7,
        "topP": 1.0,
        "maxTokens": 512,
        "seed": None,
        "extraBody": {},
    }
    assert spec["teacher"]["precision"] == "auto"
    assert spec["teacher"]["limits"]["maxConcurrency"] == 64
    assert spec["teacher"]["limits"]["maxRetries"] == 8
    assert spec["training"]["epochs"] == 1
    assert spec["training"]["learningRate"] == 2.0e-5
    assert spec["training"]["loss"] == {
        "kind": "forward_kl",
        "temperature": 1.0,
        "ceWeight": 0.0,
        "beta": 0.5,
        "unlikelihoodWeight": 0.0,
        "teacherLogits": "stored",
        "fallbackToSft": False,
    }
    assert spec["training"]["strategy"] == "ddp"
    assert spec["evaluation"]["holdoutFraction"] == 0.02
    assert spec["evaluation"]["maxNewTokens"] == 128


def test_document_round_trips() -> None:
    job = DistillationJob.model_validate(MINIMAL)
    document = job.to_document()
    again = DistillationJob.model_validate(document)
    assert again == job
    assert again.to_document() == document


def test_design_example_validates() -> None:
    job = DistillationJob.model_validate(yaml.safe_load(DESIGN_EXAMPLE))
    assert job.metadata.name == "support-bot-small"
    assert job.spec.prompts.sources[0].path == "s3://stillhouse/seeds/support.jsonl"
    assert job.spec.prompts.generate.count == 20000
    assert job.spec.teacher.base_url == "https://api.deepseek.com/v1"
    assert job.spec.teacher.api_key_secret == "deepseek"
    assert job.spec.teacher.limits.tokens_per_minute == 1_000_000
    assert job.spec.teacher.budget_usd == 50
    assert job.spec.training.loss.ce_weight == 0.5
    assert job.spec.training.strategy == "fsdp"
    assert job.spec.training.workers == 8
    assert DistillationJob.model_validate(job.to_document()) == job


@pytest.mark.parametrize(
    ("path", "loc"),
    [
        (("colour",), ("colour",)),
        (("spec", "colour"), ("spec", "colour")),
        (("spec", "training", "epochz"), ("spec", "training", "epochz")),
        (("spec", "teacher", "sampling", "temprature"), ("spec", "teacher", "sampling", "temprature")),
        (("metadata", "namespace"), ("metadata", "namespace")),
    ],
)
def test_unknown_field_is_refused_where_it_is(path: tuple[str, ...], loc: tuple) -> None:
    error = refused_at(with_changes(path, 3), loc, "Extra inputs are not permitted")
    assert error["type"] == "extra_forbidden"


@pytest.mark.parametrize(("cpus", "complaint"), [(0, "greater than 0"), (513, "less than or equal to 512")])
def test_cpus_per_worker_are_bounded(cpus: int, complaint: str) -> None:
    path = ("spec", "training", "cpusPerWorker")
    refused_at(with_changes(path, cpus), path, complaint)


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_must_be_positive(epochs: int) -> None:
    refused_at(
        with_changes(("spec", "training", "epochs"), epochs), ("spec", "training", "epochs"), "greater than 0"
    )


@pytest.mark.parametrize("part", ["teacher", "student"])
def test_teacher_and_student_are_required(part: str) -> None:
    error = refused_at(with_changes(("spec", part), ...), ("spec", part), "Field required")
    assert error["type"] == "missing"


def test_openai_backend_needs_a_base_url() -> None:
    document = with_changes(
        ("spec", "teacher"), {"backend": "openai", "model": "deepseek-chat", "tokenizer": "/tokenizers/ds"}
    )
    refused_at(document, ("spec", "teacher"), "`baseURL` is required when `backend` is `openai`")
    document["spec"]["teacher"]["baseURL"] = "http://127.0.0.1:8000/v1"
    assert DistillationJob.model_validate(document).spec.teacher.base_url == "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ({"path": "seeds.jsonl", "inline": ["hello"]}, "give exactly one of `path` or `inline`"),
        ({"format": "jsonl"}, "give exactly one of `path` or `inline`"),
        ({"inline": []}, "`inline` must list at least one prompt"),
    ],
)
def test_prompt_source_needs_exactly_one_origin(source: dict, fragment: str) -> None:
    good = {"inline": ["What is distillation?"]}
    document = with_changes(("spec", "prompts"), {"sources": [good, source]})
    refused_at(document, ("spec", "prompts", "sources", 1), fragment)


@pytest.mark.parametrize(
    "init",
    [
        {},
        {"pretrained": "s3://stillhouse/models/a", "pruneTeacherDepth": 6},
        {"pruneTeacherWidth": 0.5, "config": {"num_hidden_layers": 4}},
        {"pruneTeacherDepth": 6, "pruneTeacherWidth": 0.5, "pretrained": "s3://stillhouse/models/a"},
    ],
)
def test_student_init_needs_exactly_one_choice(init: dict) -> None:
    refused_at(
        with_changes(("spec", "student", "init"), init),
        ("spec", "student", "init"),
        "give exactly one of `pretrained`, `config`, or pruning of the teacher",
    )


@pytest.mark.parametrize(
    "init",
    [
        {"pruneTeacherDepth": 6},
        {"pruneTeacherWidth": 0.5},
        {"pruneTeacherDepth": 6, "pruneTeacherWidth": 0.5},
        {"config": {"num_hidden_layers": 4}},
    ],
)
def test_each_student_init_choice_alone_is_valid(init: dict) -> None:
    assert DistillationJob.model_validate(with_changes(("spec", "student", "init"), init))


def test_min_chars_must_not_exceed_max_chars() -> None:
    document = with_changes(("spec", "prompts"), {"filters": {"minChars": 100, "maxChars": 10}})
    refused_at(document, ("spec", "prompts", "filters"), "`minChars` must not exceed `maxChars`")
    document["spec"]["prompts"]["filters"]["minChars"] = 10
    assert DistillationJob.model_validate(document).spec.prompts.filters.min_chars == 10


@pytest.mark.parametrize(
    "name", ["Support-Bot", "support_bot", "-support", "support-", "a" * 64, "support\n", ""]
)
def test_bad_metadata_name_is_refused(name: str) -> None:
    words = "at most 63 characters" if len(name) > 63 else "lower-case letters"
    refused_at(with_changes(("metadata",), {"name": name}), ("metadata", "name"), words)


@pytest.mark.parametrize("name", ["a", "support-bot-2", "a" * 63])
def test_good_metadata_name_is_accepted(name: str) -> None:
    assert DistillationJob.model_validate(with_changes(("metadata",), {"name": name})).metadata.name == name


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [("apiVersion", "stillhouse.dev/v2", "'stillhouse.dev/v1'"), ("kind", "Job", "'DistillationJob'")],
)
def test_wrong_api_version_or_kind(field: str, value: str, allowed: str) -> None:
    error = refused_at(with_changes((field,), value), (field,), allowed)
    assert error["type"] == "literal_error"


def test_unknown_loss_kind_lists_the_allowed_ones() -> None:
    document = with_changes(("spec", "training"), {"loss": {"kind": "kl"}})
    error = refused_at(document, ("spec", "training", "loss", "kind"), "'sft'")
    for kind in ("sft", "forward_kl", "reverse_kl", "jsd"):
        assert f"'{kind}'" in error["msg"]


def test_fields_have_one_spelling_on_the_wire() -> None:
    with pytest.raises(ValidationError) as refused:
        DistillationJob.model_validate(with_changes(("spec", "training", "learning_rate"), 1e-4))
    assert ("spec", "training", "learning_rate") in [error["loc"] for error in refused.value.errors()]


@pytest.mark.parametrize(
    ("generate", "fragment"),
    [
        ({"strategy": "template", "count": 5}, "`template` is required when `strategy` is `template`"),
        ({"strategy": "self_instruct"}, "`count` must be positive when `strategy` is `self_instruct`"),
        ({"strategy": "evol_instruct", "count": 3, "evolutions": []}, "at least 1 item"),
    ],
)
def test_generation_strategy_needs_its_settings(generate: dict, fragment: str) -> None:
    document = with_changes(("spec", "prompts"), {"generate": generate})
    errors = refusals(document)
    assert any(fragment in error["msg"] for error in errors), errors


def test_logit_losses_need_logprobs_or_a_local_teacher() -> None:
    document = with_changes(("spec", "teacher", "topLogprobs"), 0)
    refused_at(document, ("spec",), "teacher.topLogprobs is 0")
    document["spec"]["training"] = {"loss": {"kind": "sft"}}
    assert DistillationJob.model_validate(document).spec.training.loss.kind == "sft"

    full_from_api = with_changes(
        ("spec", "teacher"), {"backend": "openai", "baseURL": "http://127.0.0.1:1/v1", "model": "m"}
    )
    full_from_api["spec"]["training"] = {"loss": {"teacherLogits": "full"}}
    refused_at(full_from_api, ("spec",), "`full` needs a `local` teacher")
    local_full = with_changes(("spec", "training"), {"loss": {"teacherLogits": "full"}})
    assert DistillationJob.model_validate(local_full).spec.training.loss.teacher_logits == "full"


def test_a_logit_loss_with_an_api_teacher_needs_its_tokenizer() -> None:
    api_teacher = {"backend": "openai", "baseURL": "http://127.0.0.1:1/v1", "model": "m"}
    document = with_changes(("spec", "teacher"), api_teacher)
    document["spec"]["training"] = {"loss": {"kind": "jsd"}}
    error = refused_at(document, ("spec",), "training.loss.kind `jsd` compares")
    assert "set teacher.tokenizer" in error["msg"]

    named = with_changes(("spec", "teacher", "tokenizer"), "/models/tokenizers/m", document)
    assert DistillationJob.model_validate(named).spec.teacher.tokenizer == "/models/tokenizers/m"
    for loss in ({"kind": "sft"}, {"kind": "jsd", "fallbackToSft": True}):
        allowed = with_changes(("spec", "training"), {"loss": loss}, document)
        assert DistillationJob.model_validate(allowed).spec.teacher.tokenizer is None


def test_teacher_derived_students_need_a_local_teacher() -> None:
    document = with_changes(
        ("spec", "teacher"), {"backend": "openai", "baseURL": "http://127.0.0.1:1/v1", "model": "m"}
    )
    document["spec"]["student"] = {"init": {"pruneTeacherDepth": 4}}
    refused_at(document, ("spec",), "only a `local` teacher has")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_example_is_a_valid_job(path: Path) -> None:
    assert DistillationJob.model_validate(yaml.safe_load(path.read_text())).kind == "DistillationJob"


OPENAI_TEACHER = {
    "backend": "openai",
    "model": "smollm2",
    "baseURL": "http://127.0.0.1:8080/v1",
    "tokenizer": "/models/smollm2",
}


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"temperature": 1.5}, "set by Stillhouse itself"),
        ({"Top-K": 4}, "lower-case letters"),
        ({"repeat_penalty": float("inf")}, "finite"),
        ({"stop": "x" * 300}, "longer than 256"),
        ({"top_k": 10**15}, "must lie between -1e+12 and 1e+12"),
        ({f"field_{index}": 1 for index in range(17)}, "at most 16 items"),
    ],
)
def test_server_specific_sampling_fields_are_plain_bounded_and_never_our_own(extra: dict, fragment: str):
    teacher = {**OPENAI_TEACHER, "sampling": {"extraBody": extra}}
    refused_at(
        with_changes(("spec", "teacher"), teacher),
        ("spec", "teacher", "sampling", "extraBody"),
        fragment,
    )


def test_server_specific_sampling_fields_are_taken_for_an_api_teacher_only():
    teacher = {**OPENAI_TEACHER, "sampling": {"extraBody": {"repeat_penalty": 1.0, "top_k": 40}}}
    job = DistillationJob.model_validate(with_changes(("spec", "teacher"), teacher))
    assert job.spec.teacher.sampling.extra_body == {"repeat_penalty": 1.0, "top_k": 40}
    local = {**MINIMAL["spec"]["teacher"], "sampling": {"extraBody": {"top_k": 40}}}
    refused_at(with_changes(("spec", "teacher"), local), ("spec", "teacher"), "`local` teacher has none")


def test_a_teacher_precision_is_chosen_for_a_local_teacher_only():
    local = {**MINIMAL["spec"]["teacher"], "precision": "fp32"}
    job = DistillationJob.model_validate(with_changes(("spec", "teacher"), local))
    assert job.spec.teacher.precision is Precision.FP32
    refused_at(
        with_changes(("spec", "teacher", "precision"), "fp16"), ("spec", "teacher", "precision"), "auto"
    )
    server = {**OPENAI_TEACHER, "precision": "bf16"}
    refused_at(
        with_changes(("spec", "teacher"), server), ("spec", "teacher"), "`precision` applies to a `local`"
    )


def _unbounded(schema: dict[str, Any], where: str, definitions: dict[str, Any]) -> list[str]:
    """Every place in a JSON schema where a number, string, list or map has no upper bound."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _unbounded(definitions[name], f"{where}", definitions) if name in definitions else []
    found = []
    for key in ("anyOf", "oneOf", "allOf"):
        for index, option in enumerate(schema.get(key, [])):
            found += _unbounded(option, f"{where}|{index}", definitions)
    kind = schema.get("type")
    if "enum" in schema or "const" in schema or "pattern" in schema:
        return found
    if kind in ("integer", "number") and "maximum" not in schema and "exclusiveMaximum" not in schema:
        found.append(where)
    if kind == "string" and "maxLength" not in schema and "format" not in schema:
        found.append(where)
    if kind == "array":
        if "maxItems" not in schema and not (schema.get("uniqueItems") and "enum" in schema.get("items", {})):
            found.append(where)
        found += _unbounded(schema.get("items", {}), f"{where}[]", definitions)
    if kind == "object":
        for name, child in schema.get("properties", {}).items():
            found += _unbounded(child, f"{where}.{name}", definitions)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            if "maxProperties" not in schema:
                found.append(f"{where}{{}}")
            found += _unbounded(extra, f"{where}{{}}", definitions)
    return found


def test_every_size_and_number_in_the_schema_has_an_upper_bound():
    """A spec comes from any user of a shared cluster: the schema (which the API publishes) bounds every
    number, text, list and map in it."""
    schema = DistillationJob.model_json_schema(by_alias=True)
    definitions = schema.pop("$defs")
    # Enumerations and the few lists of enumerations are bounded by their values.
    bounded_by_values = {"spec.evaluation.controls", "spec.prompts.generate.evolutions"}
    unbounded = [
        where
        for where in _unbounded(schema, "job", definitions)
        if not any(where.startswith(f"job.{name}") for name in bounded_by_values)
    ]
    assert unbounded == []


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_no_float_may_be_infinite_or_nan(value):
    for section, field in [("training", "learningRate"), ("evaluation", "holdoutFraction")]:
        spec = copy.deepcopy(MINIMAL)
        spec["spec"][section] = {field: value}
        with pytest.raises(ValidationError, match="finite number"):
            DistillationJob.model_validate(spec)
