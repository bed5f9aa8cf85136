"""The sandbox a template renders in: Jinja's, with its output and its arithmetic bounded.

Jinja's `SandboxedEnvironment` keeps a template away from Python internals; this adds what it leaves
open to a hostile template. A rendered prompt may not be longer than `MAX_PROMPT_CHARS`, counted while
the output streams, so a loop that prints forever stops at the limit. `*` and `**` are checked before
they compute, so `'A' * 10**9` or `10**(10**10)` is refused instead of filling memory or running for
hours. Nothing is evaluated at compile time: Jinja folds constant expressions (a filter on literals,
`'a'|center(10000000000)`) into the compiled code, which would run them wherever the template is
compiled, outside any limit.

What this cannot bound by itself (a filter that builds one huge string, loops that print nothing)
is bounded by the process that renders: see `template_renderer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

# The longest prompt a template may render is the longest `spec.prompts.filters.maxChars` can keep.
from stillhouse.common.jobspec import MAX_PROMPT_CHARS

# A number of more digits than a prompt can hold is refused before it is computed.
MAX_NUMBER_BITS = math.ceil(MAX_PROMPT_CHARS * math.log2(10))


class TemplateError(ValueError):
    """A template that cannot produce prompts: syntax, unknown slots, empty slots, a refused operation,
    a limit exceeded."""


class BoundedSandbox(SandboxedEnvironment):
    """Jinja's sandbox with strict undefined variables, no constant folding, and `*` and `**` checked
    against `MAX_PROMPT_CHARS` before they compute."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            optimized=False,  # no folding in expressions
            finalize=_output_unchanged,  # none in output either: see `_output_unchanged`
        )

    def undeclared_variables(self, syntax_tree: nodes.Template) -> set[str]:
        """The variables a template reads from its context: `meta.find_undeclared_variables`, whose code
        generator would fold constants, with folding off."""
        tracker = _VariableTracker(self)
        tracker.visit(syntax_tree)
        return tracker.undeclared_identifiers

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _refuse_large_product(left, right)
        elif operator == "**":
            _refuse_large_power(left, right)
        return super().call_binop(context, operator, left, right)


class _VariableTracker(meta.TrackingCodeGenerator):
    def __init__(self, environment: jinja2.Environment) -> None:
        CodeGenerator.__init__(self, environment, "<introspection>", "<introspection>", optimized=False)
        self.undeclared_identifiers: set[str] = set()


@jinja2.pass_eval_context
def _output_unchanged(eval_context: EvalContext, value: Any) -> Any:
    """Output as Jinja would write it; a finalize that takes the evaluation context is one that Jinja
    cannot call at compile time, so it folds no output expression into a constant."""
    return value


def render_bounded(template: jinja2.Template, context: Mapping[str, str]) -> str:
    """The template rendered with `context`; a `TemplateError` for anything a template can get wrong,
    including a prompt longer than `MAX_PROMPT_CHARS`. A `MemoryError` is left to the caller, which
    knows the memory limit."""
    pieces = []
    length = 0
    try:
        for piece in template.generate(context):
            length += len(piece)
            if length > MAX_PROMPT_CHARS:
                raise TemplateError(
                    f"template renders a prompt of more than {MAX_PROMPT_CHARS:,} characters, "
                    "the limit for one prompt"
                )
            pieces.append(piece)
    except (TemplateError, MemoryError):
        raise
    except jinja2.TemplateError as error:
        raise TemplateError(f"template cannot render: {error}") from None
    except Exception as error:  # anything the template's own expressions raise (1/0, int('x'))
        raise TemplateError(f"template cannot render: {type(error).__name__}: {error}") from None
    return "".join(pieces)


def _refuse_large_product(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_NUMBER_BITS:
            raise _too_many_digits("*")
        return
    sequence, times = (left, right) if isinstance(right, int) else (right, left)
    if not isinstance(times, int) or not isinstance(sequence, str | list | tuple):
        return
    size = len(sequence) * times
    if size > MAX_PROMPT_CHARS:
        what, unit = ("string", "characters") if isinstance(sequence, str) else ("sequence", "items")
        raise TemplateError(
            f"template would build a {what} of {size:,} {unit} with '*', "
            f"more than the limit of {MAX_PROMPT_CHARS:,} {unit}"
        )


def _refuse_large_power(base: Any, exponent: Any) -> None:
    if not (isinstance(base, int) and isinstance(exponent, int)) or abs(base) < 2 or exponent < 1:
        return  # floats overflow with an error of their own; 0, 1, -1 and fractions stay small
    if exponent > MAX_NUMBER_BITS or exponent * math.log2(abs(base)) > MAX_NUMBER_BITS:
        raise _too_many_digits("**")


def _too_many_digits(operator: str) -> TemplateError:
    return TemplateError(
        f"template would compute a number of more than {MAX_PROMPT_CHARS:,} digits with '{operator}', "
        "more than a prompt can hold"
    )
