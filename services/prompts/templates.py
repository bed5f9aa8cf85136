"""Prompts from a Jinja template with slots: every combination in a seeded order, or sampled ones.

Templates render in Jinja's sandbox with strict undefined variables, so a template can neither reach
Python internals (`{{ ''.__class__ }}` is refused) nor silently render a missing slot as "". The
template's variables are checked against the known slots before anything renders. Rendering is bounded
in output, time and memory, in a process of its own that closing the prompts ends (`template_sandbox`,
`template_renderer`).

Each prompt comes with the value of the template's first slot (the first one it uses, in reading order),
which the held-out split groups prompts by (see `split`).

`all` walks the cartesian product of the slot values in a seeded random order without building it: the
product's index space is permuted (a numpy permutation when it is small, a keyed Feistel network with
cycle walking when it is large) and each index is decoded into one value per slot.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import NamedTuple

import jinja2
import numpy as np
from jinja2 import nodes

from stillhouse.common.jobspec import PromptGeneration, SlotCombination
from stillhouse.prompts.template_renderer import RENDER_CHUNK, RendererClosed, TemplateRenderer
from stillhouse.prompts.template_sandbox import BoundedSandbox, TemplateError

# Products up to this size are shuffled with an explicit permutation (8 bytes per combination).
MATERIALISED_PERMUTATION_MAX = 1 << 20
FEISTEL_ROUNDS = 6
# Sampled combinations come from one random generator per block of this many positions.
SAMPLED_BLOCK = 4096


class RenderedPrompt(NamedTuple):
    text: str
    first_slot_value: str  # the value of the template's first slot ("" for a template without slots)


class RenderedPrompts:
    """The prompts of a template, in order, rendered `RENDER_CHUNK` at a time by a renderer process
    that starts on the first prompt asked for. Closing it, or leaving its `with` block, ends that
    process: from any thread, also while another thread waits for prompts."""

    def __init__(
        self, renderer: TemplateRenderer, combinations: Iterator[list[str]], first: int | None, total: int
    ) -> None:
        self.total = total  # prompts in the whole rendering, whatever positions this one renders
        self._renderer = renderer
        self._combinations = combinations
        self._first = first
        self._ready: deque[RenderedPrompt] = deque()

    @property
    def pid(self) -> int | None:
        """The renderer process's id, once it has started."""
        return self._renderer.pid

    def close(self) -> None:
        self._renderer.close()

    def __enter__(self) -> RenderedPrompts:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> RenderedPrompts:
        return self

    def __next__(self) -> RenderedPrompt:
        if not self._ready and not self._renderer.closed:
            self._render_next_chunk()
        if not self._ready or self._renderer.closed:
            self.close()
            raise StopIteration
        return self._ready.popleft()

    def _render_next_chunk(self) -> None:
        chunk = list(islice(self._combinations, RENDER_CHUNK))
        if not chunk:
            return
        try:
            texts = self._renderer.render(chunk)
        except RendererClosed:
            return
        first = self._first
        self._ready.extend(
            RenderedPrompt(text, "" if first is None else combination[first])
            for text, combination in zip(texts, chunk, strict=True)
        )


def render_templates(
    generation: PromptGeneration,
    slot_values: Mapping[str, Sequence[str]],
    seed: int,
    positions: range | None = None,
) -> RenderedPrompts:
    """Up to `generation.count` prompts from `generation.template` (fewer when `all` runs out of
    combinations). `slot_values` holds `slots` and the values read from `slotFiles`, merged.
    `positions`: only the prompts at these positions of that sequence (the same prompts as in the whole
    rendering, so that shards of a stage can render parts of it apart).

    The template and its slots are checked when this is called; a `TemplateError` while rendering
    (a refused operation, an undefined attribute, a limit exceeded) comes from the iterator. Close the
    iterator (or use it in a `with` block) when stopping before its end."""
    if not generation.template:
        raise TemplateError("no template given")
    environment = BoundedSandbox()
    try:
        syntax_tree = environment.parse(generation.template)
        environment.from_string(syntax_tree)  # compiling finds unknown filters and tests
    except jinja2.TemplateSyntaxError as error:
        raise TemplateError(f"template syntax error on line {error.lineno}: {error.message}") from None
    names = sorted(environment.undeclared_variables(syntax_tree))
    unknown = [name for name in names if name not in slot_values]
    if unknown:
        known = ", ".join(repr(name) for name in sorted(slot_values)) or "none"
        listed = ", ".join(repr(name) for name in unknown)
        which = "slot" if len(unknown) == 1 else "slots"
        verb = "which is" if len(unknown) == 1 else "which are"
        raise TemplateError(
            f"template uses {which} {listed}, {verb} not in slots or slotFiles (known: {known})"
        )
    empty = [name for name in names if not slot_values[name]]
    if empty:
        raise TemplateError(f"slot {empty[0]!r} has no values")
    values = [list(slot_values[name]) for name in names]
    if generation.slot_combination is SlotCombination.ALL:
        total = min(generation.count, math.prod(len(slot) for slot in values))
    else:
        total = generation.count
    wanted = range(total) if positions is None else range(total)[positions.start : positions.stop]
    if generation.slot_combination is SlotCombination.ALL:
        combinations = _all_combinations(values, wanted, seed)
    else:
        combinations = _sampled_combinations(values, wanted, seed)
    first = _first_slot(syntax_tree, names)
    renderer = TemplateRenderer(generation.template, names)
    return RenderedPrompts(renderer, combinations, None if first is None else names.index(first), total)


def _first_slot(syntax_tree: nodes.Template, names: list[str]) -> str | None:
    """The slot the template uses first, in reading order; None when it uses none."""
    for name in syntax_tree.find_all(nodes.Name):
        if name.name in names:
            return name.name
    return None


def _all_combinations(values: list[list[str]], positions: range, seed: int) -> Iterator[list[str]]:
    sizes = [len(slot) for slot in values]
    for index in shuffled_indices(math.prod(sizes), seed, positions=positions):
        combination = []
        for slot, size in zip(reversed(values), reversed(sizes), strict=True):
            index, digit = divmod(index, size)
            combination.append(slot[digit])
        combination.reverse()
        yield combination


def _sampled_combinations(values: list[list[str]], positions: range, seed: int) -> Iterator[list[str]]:
    """Each position's combination is drawn by a generator of its block of `SAMPLED_BLOCK` positions, so
    that any run of positions is drawn without drawing all those before it."""
    rng, block = random.Random(), -1
    for position in positions:
        if position // SAMPLED_BLOCK != block:
            block = position // SAMPLED_BLOCK
            rng.seed(f"{seed}:{block}")
            for _ in range(block * SAMPLED_BLOCK, position):
                for slot in values:
                    rng.choice(slot)
        yield [rng.choice(slot) for slot in values]


def shuffled_indices(
    size: int, seed: int, *, limit: int | None = None, positions: range | None = None
) -> Iterator[int]:
    """0 .. size-1 in a seeded random order (each exactly once), stopping after `limit` of them;
    `positions`: only those positions of that order."""
    wanted = range(size if limit is None else min(size, limit))
    if positions is not None:
        wanted = wanted[positions.start : positions.stop]
    if size <= MATERIALISED_PERMUTATION_MAX:
        permutation = np.random.default_rng(seed).permutation(size)
        yield from (int(index) for index in permutation[wanted.start : wanted.stop])
        return
    feistel = _Feistel(size, seed)
    for position in wanted:
        yield feistel.permute(position)


class _Feistel:
    """A keyed bijection of [0, size): a balanced Feistel network on the smallest even number of bits
    covering `size`, with cycle walking to stay inside the range (fewer than 4 steps on average)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        bits = max(2, (size - 1).bit_length())
        self.half_bits = (bits + 1) // 2
        self.half_mask = (1 << self.half_bits) - 1
        self.keys = [
            hashlib.blake2b(f"{seed}:{round_}".encode(), digest_size=8).digest()
            for round_ in range(FEISTEL_ROUNDS)
        ]

    def permute(self, value: int) -> int:
        while True:
            value = self._encrypt(value)
            if value < self.size:
                return value

    def _encrypt(self, value: int) -> int:
        left, right = value >> self.half_bits, value & self.half_mask
        for key in self.keys:
            mixed = int.from_bytes(
                hashlib.blake2b(right.to_bytes(16, "little"), key=key, digest_size=8).digest()
            )
            left, right = right, left ^ (mixed & self.half_mask)
        return (left << self.half_bits) | right
