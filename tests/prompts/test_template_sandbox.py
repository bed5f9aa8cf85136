"""The bounded sandbox, in this process: what it refuses before computing, what it stops while
rendering, and that compiling a template evaluates nothing."""

from __future__ import annotations

import pytest

from stillhouse.prompts.template_sandbox import (
    MAX_PROMPT_CHARS,
    BoundedSandbox,
    TemplateError,
    render_bounded,
)


def render(source: str, **context: str) -> str:
    return render_bounded(BoundedSandbox().from_string(source), context)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ 'A' * 10**7 }}", "a string of 10,000,000 characters with '*', more than the limit of 65,536"),
        ("{{ 10**7 * tone }}", "a string of 40,000,000 characters with '*'"),
        ("{{ [0, 1] * 10**6 }}", "a sequence of 2,000,000 items with '*', more than the limit of 65,536"),
        ("{{ 10 ** (10 ** 10) }}", "a number of more than 65,536 digits with '**'"),
        ("{{ (-7) ** 100000 }}", "a number of more than 65,536 digits with '**'"),
        ("{{ (10 ** 40000) * (10 ** 40000) }}", "a number of more than 65,536 digits with '*'"),
    ],
)
def test_products_and_powers_too_large_for_a_prompt_are_refused_before_computing(source, words):
    with pytest.raises(TemplateError) as refused:
        render(source, tone="calm")
    assert words in str(refused.value)


def test_arithmetic_within_the_limits_renders_as_jinja_would():
    # Jinja's `**` groups to the left: 10**10**10 is (10**10)**10.
    assert render("{{ 10**10**10 }}") == str(10**100)
    assert render("{{ 2 ** 100 }} {{ 2 ** -1 }} {{ 0 ** 10**9 }} {{ 1.5 * 2 }}") == f"{2**100} 0.5 0 3.0"
    assert render("{{ tone * 3 }}|{{ 2 * [tone] }}|{{ '-' * 0 }}", tone="ab") == "ababab|['ab', 'ab']|"
    assert render(f"{{{{ 'A' * {MAX_PROMPT_CHARS} }}}}") == "A" * MAX_PROMPT_CHARS


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a'|center(100000) }}",
        "{{ '%99999s'|format('x') }}",
        "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
        "{{ 'a' * 40000 }}{{ 'b' * 40000 }}",
    ],
)
def test_a_prompt_longer_than_the_limit_is_refused(source):
    with pytest.raises(TemplateError, match="a prompt of more than 65,536 characters, the limit"):
        render(source)


def test_errors_a_template_raises_become_template_errors_naming_their_kind():
    with pytest.raises(TemplateError, match="cannot render: ZeroDivisionError: division by zero"):
        render("{{ 1 / 0 }}")
    with pytest.raises(TemplateError, match="cannot render: 'tone' is undefined"):
        render("{{ tone }}")


def test_compiling_a_template_evaluates_nothing():
    sandbox = BoundedSandbox()
    calls = []
    sandbox.filters["spy"] = lambda value: calls.append(value) or value
    syntax_tree = sandbox.parse("{{ 'a'|spy }}{{ ('b'|spy) ~ tone }}{% set x = 'c'|spy %}{{ x }}")

    assert sandbox.undeclared_variables(syntax_tree) == {"tone"}
    template = sandbox.from_string(syntax_tree)
    assert calls == []

    assert render_bounded(template, {"tone": "-"}) == "ab-c"
    assert calls == ["a", "b", "c"]
