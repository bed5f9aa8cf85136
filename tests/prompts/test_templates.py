"""Template prompts: every combination or sampled ones, deterministic, refused when unsafe or wrong,
and bounded in size, time and memory by a renderer process that closing the prompts ends."""

from __future__ import annotations

import asyncio
import itertools

import psutil
import pytest

from stillhouse.common.jobspec import PromptGeneration
from stillhouse.prompts import template_renderer, templates
from stillhouse.prompts.templates import TemplateError, render_templates, shuffled_indices

TEMPLATE = "Write a {{ tone }} product description for {{ product }}."
SLOTS = {"tone": ["formal", "playful", "terse"], "product": ["a kettle", "a bike", "a lamp", "a tent"]}


def generation(combination: str = "all", count: int = 5, template: str = TEMPLATE) -> PromptGeneration:
    return PromptGeneration(strategy="template", count=count, template=template, slotCombination=combination)


def test_all_enumerates_distinct_combinations_up_to_count():
    prompts = [prompt.text for prompt in render_templates(generation(count=5), SLOTS, seed=1)]
    assert len(prompts) == 5 == len(set(prompts))
    expected = {
        f"Write a {tone} product description for {product}."
        for tone, product in itertools.product(SLOTS["tone"], SLOTS["product"])
    }
    assert set(prompts) <= expected


def test_all_stops_when_the_product_runs_out():
    prompts = list(render_templates(generation(count=1000), SLOTS, seed=1))
    assert len(prompts) == 12 == len(set(prompts))


def test_all_order_is_shuffled_and_seeded():
    first = [prompt.text for prompt in render_templates(generation(count=12), SLOTS, seed=1)]
    assert first == [prompt.text for prompt in render_templates(generation(count=12), SLOTS, seed=1)]
    assert first != [prompt.text for prompt in render_templates(generation(count=12), SLOTS, seed=2)]
    in_product_order = [
        f"Write a {tone} product description for {product}."
        for tone, product in itertools.product(SLOTS["tone"], SLOTS["product"])
    ]
    assert first != in_product_order


def test_sampled_draws_count_prompts_deterministically():
    prompts = list(render_templates(generation("sampled", count=200), SLOTS, seed=7))
    assert len(prompts) == 200
    assert prompts == list(render_templates(generation("sampled", count=200), SLOTS, seed=7))
    assert prompts != list(render_templates(generation("sampled", count=200), SLOTS, seed=8))
    # Drawn with replacement, each slot independently: every combination shows up in 200 draws.
    assert len(set(prompts)) == 12


def test_each_prompt_carries_the_value_of_the_templates_first_slot():
    # `tone` comes first in the template, though `product` sorts first.
    for prompt in render_templates(generation(count=12), SLOTS, seed=1):
        assert prompt.text.startswith(f"Write a {prompt.first_slot_value} product")
    later = "For {{ product }}: a {% if tone == 'terse' %}short{% else %}{{ tone }}{% endif %} text."
    for prompt in render_templates(generation(count=12, template=later), SLOTS, seed=1):
        assert prompt.text.startswith(f"For {prompt.first_slot_value}:")
    assert {p.first_slot_value for p in render_templates(generation(template="Hi."), SLOTS, seed=1)} == {""}


def test_only_the_slots_the_template_uses_are_combined():
    slots = {**SLOTS, "unused": ["x", "y", "z"]}
    assert len(list(render_templates(generation(count=100), slots, seed=1))) == 12


def test_huge_products_are_walked_without_building_them():
    slots = {f"s{i}": [f"v{j}" for j in range(10)] for i in range(12)}  # 10**12 combinations
    template = " ".join(f"{{{{ s{i} }}}}" for i in range(12))
    prompts = list(render_templates(generation(count=2000, template=template), slots, seed=3))
    assert len(prompts) == 2000 == len(set(prompts))
    assert prompts == list(render_templates(generation(count=2000, template=template), slots, seed=3))


def test_feistel_order_is_a_permutation(monkeypatch):
    monkeypatch.setattr(templates, "MATERIALISED_PERMUTATION_MAX", 10)
    for size in (1, 2, 3, 1000, 4097):
        order = list(shuffled_indices(size, seed=5))
        assert sorted(order) == list(range(size))
    assert list(shuffled_indices(1000, seed=5)) != list(range(1000))
    assert list(shuffled_indices(1000, seed=5, limit=10)) == list(shuffled_indices(1000, seed=5))[:10]


def test_unknown_slot_is_refused_before_rendering():
    with pytest.raises(TemplateError) as raised:
        render_templates(generation(template="{{ product }} in {{ city }}"), SLOTS, seed=1)
    assert str(raised.value) == (
        "template uses slot 'city', which is not in slots or slotFiles (known: 'product', 'tone')"
    )


def test_syntax_error_names_its_line():
    with pytest.raises(TemplateError, match="syntax error on line 2"):
        render_templates(generation(template="fine\n{{ product "), SLOTS, seed=1)


def test_slot_without_values_is_refused():
    with pytest.raises(TemplateError, match="slot 'tone' has no values"):
        render_templates(generation(), {**SLOTS, "tone": []}, seed=1)


@pytest.mark.parametrize(
    "template",
    ["{{ ''.__class__ }}", "{{ product.__class__.__mro__ }}", "{{ product.__init__.__globals__ }}"],
)
def test_sandbox_refuses_attribute_tricks(template):
    with pytest.raises(TemplateError, match="unsafe"):
        list(render_templates(generation(template=template), SLOTS, seed=1))


def test_undefined_attributes_fail_instead_of_rendering_empty():
    with pytest.raises(TemplateError, match="cannot render"):
        list(render_templates(generation(template="{{ product.colour }}"), SLOTS, seed=1))


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{{ 'A' * 10**7 }}", "a string of 10,000,000 characters with '*', more than the limit of 65,536"),
        ("{{ 10**(10**10) }}", "a number of more than 65,536 digits"),
        ("{{ 'a'|center(100000000) }}", "a prompt of more than 65,536 characters, the limit for one prompt"),
        ("{{ '%99999999s'|format('x') }}", "a prompt of more than 65,536 characters"),
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
            "a prompt of more than 65,536 characters",
        ),
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            "took more than 1 s to render one prompt, the limit for one prompt",
        ),
        ("{{ 'a'|center(2000000000) }}", "more than 512 MiB of memory to render one prompt"),
    ],
    ids=["repeat", "power", "center", "format", "printing-loops", "silent-loops", "memory"],
)
def test_hostile_templates_are_refused_naming_the_limit(template, words):
    rendering = render_templates(generation(template=template), SLOTS, seed=1)
    with pytest.raises(TemplateError) as refused:
        list(rendering)
    assert words in str(refused.value)
    assert not psutil.pid_exists(rendering.pid)


def test_one_renderer_process_serves_all_chunks_and_ends_with_the_prompts(monkeypatch):
    monkeypatch.setattr(templates, "RENDER_CHUNK", 5)
    rendering = render_templates(generation("sampled", count=23), SLOTS, seed=1)
    first = next(rendering)
    renderer = psutil.Process(rendering.pid)
    assert "stillhouse.prompts.template_renderer" in renderer.cmdline()

    rest = list(rendering)

    assert [first, *rest] == list(render_templates(generation("sampled", count=23), SLOTS, seed=1))
    assert rendering.pid == renderer.pid
    assert not renderer.is_running()


def test_closing_the_prompts_early_ends_the_renderer_process():
    with render_templates(generation(count=12), SLOTS, seed=1) as rendering:
        next(rendering)
        renderer = psutil.Process(rendering.pid)
        assert renderer.is_running()
    assert not renderer.is_running()
    assert list(rendering) == []


async def test_cancelling_the_consumer_ends_a_renderer_busy_with_a_prompt(monkeypatch):
    # A budget no test waits for: only the cancellation can end this renderer.
    monkeypatch.setattr(template_renderer, "RENDER_SECONDS", 3600.0)
    endless = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    rendering = render_templates(generation(template=endless), SLOTS, seed=1)

    async def consume() -> None:  # as the prompts stage does
        with rendering:
            await asyncio.to_thread(lambda: list(itertools.islice(rendering, 8)))

    task = asyncio.create_task(consume())
    while rendering.pid is None:
        await asyncio.sleep(0.01)
    renderer = psutil.Process(rendering.pid)
    while renderer.cpu_times().user < 0.2:  # rendering, not starting
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not renderer.is_running()
