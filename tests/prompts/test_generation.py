"""Self-Instruct and Evol-Instruct through the real gRPC teacher client, against the fake teacher process."""

from __future__ import annotations

import grpc
import pytest
from service_token import SERVICE_TOKEN

from stillhouse.common.jobspec import PromptFilters, PromptGeneration
from stillhouse.common.operations import OperationError
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.prompts.cleaning import PromptCleaner, normalise
from stillhouse.prompts.generation import (
    GenerationError,
    call_seed,
    evol_instruct,
    evolution_rule,
    instruction_rule,
    parse_instruction_list,
    self_instruct,
)
from stillhouse.prompts.teacher_client import TeacherClient

CREDENTIALS = ServiceCredentials(tokens=(SERVICE_TOKEN,), tls=None)
SEEDS = [
    "Write a haiku about the first snow of the winter in a mountain village.",
    "How do I reverse a linked list in Python without using recursion?",
    "Give me three arguments for and against a four-day working week.",
    "Explain the difference between weather and climate to a child.",
    "Draft a polite email asking my landlord to fix a leaking kitchen tap.",
    "What should I pack for a week-long hiking trip in the Scottish Highlands?",
    "Translate 'where is the train station' into Spanish, French and German.",
    "Suggest a vegetarian dinner menu for six guests with one nut allergy.",
]


async def generate(strategy, address: str, teacher: dict, *, job_id: str, seed: int = 7, **generation):
    """Run a strategy as the stage does: the seeds are cleaned first, candidates go through the cleaner."""
    cleaner = PromptCleaner(PromptFilters())
    cleaner.admit_batch(SEEDS)

    async def admit(texts: list[str]) -> list[str | None]:
        return cleaner.admit_batch(texts)

    options = {key: generation.pop(key) for key in ("concurrency", "patience") if key in generation}
    spec = PromptGeneration.model_validate({"strategy": strategy.__name__, **generation})
    async with TeacherClient(
        address, credentials=CREDENTIALS, job_id=job_id, tenant="t", teacher=teacher, timeout_seconds=30
    ) as client:
        outcome = await strategy(spec, SEEDS, client, admit, seed=seed, **options)
    return outcome, client.ledger, cleaner


def test_instruction_lists_are_parsed_and_checked_like_the_paper():
    reply = (
        "Sure! Here are new tasks:\n6. Write a limerick about a lazy cat.\n7) Explain why the sky\n"
        "   looks blue at noon.\n- Describe the attached photo of a beach.\n8. Say hi\n9. ...and so on\n"
        '10. "Name three rivers in Africa."\n\nI hope these help!'
    )
    items = parse_instruction_list(reply)
    assert items == [
        "Write a limerick about a lazy cat.",
        "Explain why the sky looks blue at noon.",
        "Describe the attached photo of a beach.",
        "Say hi",
        "...and so on",
        "Name three rivers in Africa.",
    ]
    assert [instruction_rule(item) for item in items] == [
        None,
        None,
        "generation_unseeable_input",
        "generation_too_short",
        "generation_not_instruction",
        None,
    ]


ORIGINAL = "Explain how ocean tides form and why most coasts see two of them a day."


@pytest.mark.parametrize(
    ("evolved", "rule"),
    [
        (ORIGINAL + " Use one real harbour as the example and give its tidal range in metres.", None),
        ("explain how ocean tides form, and why most coasts see two of them a day", "generation_unchanged"),
        ("Sorry, I cannot make this prompt more complex.", "generation_refusal"),
        ("#Rewritten Prompt#: " + ORIGINAL + " Add a diagram.", "generation_template_copy"),
        ("The rewritten prompt asks about tides in more depth.", "generation_template_copy"),
        ("Tides?", "generation_too_short"),
    ],
)
def test_evolved_prompts_are_eliminated_by_the_papers_checks(evolved, rule):
    assert evolution_rule(ORIGINAL, evolved) == rule


async def test_self_instruct_reaches_the_count_the_same_way_every_time(fake_teacher, teacher_spec):
    settings = {"job_id": "job-si", "count": 20, "fewShot": 4, "temperature": 0.9}
    first, ledger, cleaner = await generate(self_instruct, fake_teacher.address, teacher_spec(), **settings)
    second, _, _ = await generate(self_instruct, fake_teacher.address, teacher_spec(), **settings)

    assert len(first.prompts) == 20 and first.shortfall == 0
    assert first.prompts == second.prompts
    assert len({normalise(text) for text in first.prompts} | {normalise(text) for text in SEEDS}) == 28
    assert not any("image" in text for text in first.prompts)
    assert first.eliminated["generation_unseeable_input"] > 0
    assert cleaner.removed_by_rule.get("exact_duplicate", 0) >= 1  # the teacher copies an example back
    calls = fake_teacher.calls("job-si")
    assert {call["temperature"] for call in calls} == {0.9}
    assert len(calls) == 2 * first.teacher_calls  # each call has its own seed, the same in both runs
    assert {call["seed"] for call in calls} == {
        call_seed(7, "self_instruct", index) for index in range(first.teacher_calls)
    }
    assert ledger.requests == first.teacher_calls
    assert ledger.prompt_tokens > 0 and ledger.completion_tokens > 0
    assert ledger.cost_usd == pytest.approx((ledger.prompt_tokens + 2 * ledger.completion_tokens) / 1e6)


async def test_self_instruct_stops_short_when_the_teacher_repeats_itself(fake_teacher, teacher_spec):
    outcome, ledger, _ = await generate(
        self_instruct,
        fake_teacher.address,
        teacher_spec("fake-repeating"),
        job_id="job-repeat",
        count=50,
        concurrency=2,
        patience=4,
    )

    assert len(outcome.prompts) == 3  # the first answer's three instructions; every later one repeats them
    assert outcome.shortfall == 47
    # One productive call, four that added nothing, and the one in flight when it gave up.
    assert outcome.teacher_calls == 6 == ledger.requests
    assert "4 teacher calls in a row added no new prompt" in outcome.stopped_reason


async def test_evol_instruct_rewrites_and_eliminates_as_the_paper_does(fake_teacher, teacher_spec):
    evolve = {"job_id": "job-evol", "count": 15, "rounds": 2, "evolutions": ["constrain", "breadth"]}
    first, ledger, _ = await generate(evol_instruct, fake_teacher.address, teacher_spec(), **evolve)
    second, _, _ = await generate(evol_instruct, fake_teacher.address, teacher_spec(), **evolve)

    assert len(first.prompts) == 15 and first.prompts == second.prompts
    assert not {normalise(text) for text in first.prompts} & {normalise(text) for text in SEEDS}
    assert not any("prompt#" in text.lower() or "sorry" in text.lower() for text in first.prompts)
    for rule in ("generation_refusal", "generation_template_copy", "generation_unchanged"):
        assert first.eliminated[rule] > 0, rule
    assert ledger.requests == first.teacher_calls > 15


@pytest.mark.parametrize("strategy", [self_instruct, evol_instruct])
async def test_strategies_refuse_to_start_without_seed_prompts(strategy):
    spec = PromptGeneration.model_validate({"strategy": strategy.__name__, "count": 3})
    with pytest.raises(GenerationError, match=f"{strategy.__name__} needs .*spec.prompts.sources"):
        await strategy(spec, [], completer=None, admit=None, seed=0)  # refused before any call


async def test_teacher_failures_become_clear_stage_errors(fake_teacher, teacher_spec, free_port):
    messages = [{"role": "user", "content": "hello"}]
    async with TeacherClient(
        fake_teacher.address,
        credentials=CREDENTIALS,
        job_id="j",
        tenant="t",
        teacher=teacher_spec("fake-missing"),
        timeout_seconds=5,
    ) as client:
        with pytest.raises(OperationError) as refused:
            await client.complete(messages, temperature=1.0, seed=1)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "fake-missing" in refused.value.message

    nowhere = f"127.0.0.1:{free_port()}"
    async with TeacherClient(
        nowhere, credentials=CREDENTIALS, job_id="j", tenant="t", teacher=teacher_spec(), timeout_seconds=5
    ) as client:
        with pytest.raises(OperationError) as unreachable:
            await client.complete(messages, temperature=1.0, seed=1)
    assert unreachable.value.code is grpc.StatusCode.UNAVAILABLE
    assert nowhere in unreachable.value.message
