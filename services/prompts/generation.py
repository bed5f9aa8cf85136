"""New prompts written by the teacher: Self-Instruct bootstrapping and Evol-Instruct rewriting.

Pure logic: the teacher is a `Completer`, and what happens to a candidate prompt after the checks here
(cleaning, the held-out split, writing) is the caller's `Admit` function, which says for each candidate
whether it was kept or which rule removed it. Generation stops at `count` kept prompts, or after
`patience` teacher calls in a row that added nothing; the gap is the shortfall.

Determinism: every teacher call gets a seed derived from the job's seed and the call's index, and is
built from the state the previous calls left, processed strictly in call order. Calls run concurrently
in a sliding window, yet call i is always built after exactly the calls before i - window were
processed, so the prompts do not depend on which answer arrives first. The same seed and the same
teacher answers give the same prompts (and the teacher's cache answers a repeated run for free).

- Self-Instruct (Wang et al., 2022): each call shows `fewShot` instructions sampled from the pool
  (mostly seed prompts, some generated ones), asks for new numbered instructions, and adds the ones
  that pass to the pool.
- Evol-Instruct (Xu et al., 2023, WizardLM): a seed prompt is rewritten `rounds` times in a row, each
  time with an evolution drawn from `evolutions` (deepen, constrain, concretize, reasoning: a harder
  version of the same task; breadth: a new task of the same domain). A rewrite is eliminated, as in the
  paper, when it is no different from its original, is a refusal, is too short, or copies the
  rewriting template's own words.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stillhouse.common.jobspec import Evolution, PromptGeneration
from stillhouse.prompts.cleaning import normalise, words

# For each candidate: None when the caller kept it, else the name of the rule that removed it.
Admit = Callable[[list[str]], Awaitable[list[str | None]]]

# Teacher calls in flight at once.
DEFAULT_CONCURRENCY = 8
# Consecutive teacher calls that add no prompt before generation gives up on reaching `count`.
DEFAULT_PATIENCE = 16
# New instructions asked for per Self-Instruct call (the paper asks for 8; small teachers manage fewer).
INSTRUCTIONS_PER_CALL = 5
# Of the few-shot examples of a Self-Instruct call, at most this fraction are generated ones (the paper
# shows 6 seeds and 2 generated).
GENERATED_EXAMPLE_SHARE = 0.25
MIN_WORDS = 3
MAX_WORDS = 150
# A rewrite sharing this fraction of its words with the original adds nothing.
UNCHANGED_WORD_JACCARD = 0.9


class Completer(Protocol):
    async def complete(self, messages: list[dict[str, str]], *, temperature: float, seed: int) -> str: ...


class GenerationError(ValueError):
    """The spec cannot generate prompts as asked (e.g. no seed prompts to start from)."""


@dataclass
class GenerationOutcome:
    prompts: list[str] = field(default_factory=list)
    teacher_calls: int = 0
    # Candidates removed here, before the caller saw them: rule -> count.
    eliminated: Counter[str] = field(default_factory=Counter)
    shortfall: int = 0
    stopped_reason: str = ""


@dataclass
class Step:
    """What one unit of work (a Self-Instruct call, an Evol-Instruct chain) produced."""

    calls: int = 0
    candidates: list[str] = field(default_factory=list)
    eliminated: list[str] = field(default_factory=list)


def call_seed(job_seed: int, strategy: str, call_index: int, part: int = 0) -> int:
    """The sampling seed of one generation call: distinct per call and per part of a generation, the
    same in every run."""
    stream = strategy if part == 0 else f"{strategy}/{part}"
    digest = hashlib.blake2b(f"{job_seed}:{stream}:{call_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 33  # 31 bits: every backend takes it


# --- checks shared by both strategies ---------------------------------------------------------------

_UNSEEABLE_INPUT = re.compile(
    r"\b(image|images|picture|pictures|photo|photos|graph|graphs|diagram|diagrams|flowchart|video|videos|"
    r"audio|recording|attached|attachment|file|files|link|url|website|draw|plot|map|maps|go to)\b"
)
_REFUSAL = re.compile(r"\b(sorry|i cannot|i can't|i'm unable|i am unable|as an ai)\b")
# The rewriting templates' own words: "given prompt" also catches "#The Given Prompt#".
_TEMPLATE_WORDS = ("given prompt", "rewritten prompt", "created prompt")


def _length_rule(text: str) -> str | None:
    count = len(text.split())
    if count < MIN_WORDS:
        return "generation_too_short"
    if count > MAX_WORDS:
        return "generation_too_long"
    return None


# --- what makes a strategy ----------------------------------------------------------------------------

# The teacher call of step `index`, given the outcome so far.
NextCall = Callable[[int, GenerationOutcome], Awaitable[Step]]
# (generation, seed prompts, completer, job seed, part) -> the calls of that part of the generation.
PlanCalls = Callable[[PromptGeneration, Sequence[str], Completer, int, int], NextCall]
Strategy = Callable[..., Awaitable[GenerationOutcome]]


def _strategy(name: str, seeds_needed_as: str, plan_calls: PlanCalls) -> Strategy:
    """The strategy `name`: it asks the teacher the calls `plan_calls` makes from the seeds until
    `generation.count` prompts are admitted (or it runs out of patience).

    A generation may be cut into parts that run apart: part `part` asks for `count` prompts (instead of
    `generation.count`) with calls of its own, seeded by the part's number."""

    async def strategy(
        generation: PromptGeneration,
        seeds: Sequence[str],
        completer: Completer,
        admit: Admit,
        *,
        seed: int,
        concurrency: int = DEFAULT_CONCURRENCY,
        patience: int = DEFAULT_PATIENCE,
        on_progress: Callable[[GenerationOutcome], None] = lambda outcome: None,
        part: int = 0,
        count: int | None = None,
    ) -> GenerationOutcome:
        if not seeds:
            raise GenerationError(f"{name} needs {seeds_needed_as}: add spec.prompts.sources")
        next_call = plan_calls(generation, seeds, completer, seed, part)
        wanted = generation.count if count is None else count
        return await _generate(wanted, next_call, admit, concurrency, patience, on_progress)

    strategy.__name__ = strategy.__qualname__ = name
    return strategy


# --- Self-Instruct ----------------------------------------------------------------------------------

# "12. text", "12) text", "12: text"; small teachers often answer with bullets instead.
_LIST_ITEM = re.compile(r"^\s*(?:\d{1,3}\s*[.):]|[-*•])\s*(.*)$")
_QUOTES = "\"'\u201c\u201d\u2018\u2019\u00ab\u00bb"


def self_instruct_messages(examples: Sequence[str], wanted: int) -> list[dict[str, str]]:
    listing = "\n".join(f"{number}. {' '.join(text.split())}" for number, text in enumerate(examples, 1))
    first_new = len(examples) + 1
    return [
        {
            "role": "user",
            "content": "You are asked to come up with new, diverse task instructions for an AI assistant. "
            f"Here are some examples:\n\n{listing}\n\n"
            f"Write {wanted} new instructions as a numbered list starting at {first_new}. Each one must be "
            "different from the examples and from each other, self-contained, and answerable in text "
            "alone: no images, files, links or audio. Write only the list.",
        }
    ]


def parse_instruction_list(reply: str) -> list[str]:
    """The items of a numbered (or bulleted) list, without quotes around them. An item continues on the
    lines right after it; text before the first item ("Here are five new instructions:") or after a
    blank line is not part of any item."""
    items: list[list[str]] = []
    open_item = False
    for line in reply.splitlines():
        item = _LIST_ITEM.match(line)
        if item:
            items.append([item.group(1).strip()])
            open_item = True
        elif not line.strip():
            open_item = False
        elif open_item:
            items[-1].append(line.strip())
    texts = (" ".join(parts).strip().strip(_QUOTES).strip() for parts in items)
    return [text for text in texts if text]


def instruction_rule(text: str) -> str | None:
    """Why a generated instruction is not one worth asking, or None (the paper's heuristic filters)."""
    if rule := _length_rule(text):
        return rule
    if not text[0].isalnum():
        return "generation_not_instruction"
    if _UNSEEABLE_INPUT.search(text.lower()):
        return "generation_unseeable_input"
    return None


def _self_instruct_calls(
    generation: PromptGeneration, seeds: Sequence[str], completer: Completer, seed: int, part: int
) -> NextCall:
    rng = random.Random(f"self_instruct:{seed}" if part == 0 else f"self_instruct:{seed}/{part}")

    def next_call(index: int, outcome: GenerationOutcome) -> Awaitable[Step]:
        generated = outcome.prompts
        shown_generated = min(len(generated), int(generation.few_shot * GENERATED_EXAMPLE_SHARE))
        shown_seeds = min(len(seeds), generation.few_shot - shown_generated)
        examples = rng.sample(seeds, shown_seeds) + rng.sample(generated, shown_generated)
        rng.shuffle(examples)
        return ask(self_instruct_messages(examples, INSTRUCTIONS_PER_CALL), index)

    async def ask(messages: list[dict[str, str]], index: int) -> Step:
        reply = await completer.complete(
            messages,
            temperature=generation.temperature,
            seed=call_seed(seed, "self_instruct", index, part),
        )
        step = Step(calls=1)
        for text in parse_instruction_list(reply):
            if rule := instruction_rule(text):
                step.eliminated.append(rule)
            else:
                step.candidates.append(text)
        return step

    return next_call


self_instruct = _strategy("self_instruct", "seed prompts to show the teacher", _self_instruct_calls)


# --- Evol-Instruct ----------------------------------------------------------------------------------

_DEPTH_TEMPLATE = (
    "I want you to act as a Prompt Rewriter. Your objective is to rewrite a given prompt into a more "
    "complex version, to make famous AI systems (e.g. ChatGPT and GPT-4) a bit harder to handle. The "
    "rewritten prompt must be reasonable and must be understood and answered by humans. Do not omit the "
    "non-text parts such as tables and code in #The Given Prompt#. Complicate the given prompt using "
    "the following method:\n{method}\n"
    "Try your best not to make #Rewritten Prompt# verbose: it can only add 10 to 20 words to "
    "#The Given Prompt#. '#The Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten "
    "prompt' are not allowed to appear in #Rewritten Prompt#.\n"
    "#The Given Prompt#:\n{prompt}\n#Rewritten Prompt#:\n"
)
_DEPTH_METHODS = {
    Evolution.CONSTRAIN: "Add one more constraint or requirement to #The Given Prompt#.",
    Evolution.DEEPEN: "If #The Given Prompt# contains inquiries about certain issues, increase the depth "
    "and breadth of the inquiry.",
    Evolution.CONCRETIZE: "Replace general concepts with more specific concepts.",
    Evolution.REASONING: "If #The Given Prompt# can be solved with just a few simple thinking processes, "
    "rewrite it to explicitly request multiple-step reasoning.",
}
_BREADTH_TEMPLATE = (
    "I want you to act as a Prompt Creator. Your goal is to draw inspiration from #Given Prompt# to "
    "create a brand new prompt. The new prompt should belong to the same domain as #Given Prompt# but "
    "be even rarer. The length and complexity of #Created Prompt# should be similar to those of "
    "#Given Prompt#. #Created Prompt# must be reasonable and must be understood and answered by humans. "
    "'#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created prompt' are not allowed to appear "
    "in #Created Prompt#.\n"
    "#Given Prompt#:\n{prompt}\n#Created Prompt#:\n"
)


def evolution_messages(evolution: Evolution, prompt: str) -> list[dict[str, str]]:
    if evolution is Evolution.BREADTH:
        content = _BREADTH_TEMPLATE.format(prompt=prompt)
    else:
        content = _DEPTH_TEMPLATE.format(method=_DEPTH_METHODS[evolution], prompt=prompt)
    return [{"role": "user", "content": content}]


def evolution_rule(original: str, evolved: str) -> str | None:
    """The elimination check an evolved prompt fails, or None (Xu et al., 2023, section 3.3)."""
    lowered = evolved.lower()
    if any(words in lowered for words in _TEMPLATE_WORDS):
        return "generation_template_copy"
    if _REFUSAL.search(lowered):
        return "generation_refusal"
    if rule := _length_rule(evolved):
        return rule
    before, after = normalise(original), normalise(evolved)
    if before == after or _word_jaccard(before, after) >= UNCHANGED_WORD_JACCARD:
        return "generation_unchanged"
    return None


def _word_jaccard(first: str, second: str) -> float:
    a, b = set(words(first)), set(words(second))
    return len(a & b) / len(a | b) if a | b else 1.0


def _evol_instruct_calls(
    generation: PromptGeneration, seeds: Sequence[str], completer: Completer, seed: int, part: int
) -> NextCall:
    """Each step here is one chain of `rounds` rewrites of one seed prompt; its last rewrite is the
    candidate. A chain stops at its first eliminated rewrite and then offers nothing."""
    rng = random.Random(f"evol_instruct:{seed}" if part == 0 else f"evol_instruct:{seed}/{part}")

    def next_call(index: int, outcome: GenerationOutcome) -> Awaitable[Step]:
        original = seeds[rng.randrange(len(seeds))]
        evolutions = [rng.choice(generation.evolutions) for _ in range(generation.rounds)]
        return evolve_chain(index, original, evolutions)

    async def evolve_chain(index: int, original: str, evolutions: list[Evolution]) -> Step:
        step, current = Step(), original
        for round_index, evolution in enumerate(evolutions):
            reply = await completer.complete(
                evolution_messages(evolution, current),
                temperature=generation.temperature,
                seed=call_seed(seed, "evol_instruct", index * len(evolutions) + round_index, part),
            )
            step.calls += 1
            evolved = reply.strip().strip('"').strip()
            if rule := evolution_rule(current, evolved):
                step.eliminated.append(rule)
                return step
            current = evolved
        step.candidates.append(current)
        return step

    return next_call


evol_instruct = _strategy("evol_instruct", "prompts to evolve", _evol_instruct_calls)


# --- the loop both strategies share -----------------------------------------------------------------


async def _generate(
    count: int,
    next_call: NextCall,
    admit: Admit,
    concurrency: int,
    patience: int,
    on_progress: Callable[[GenerationOutcome], None],
) -> GenerationOutcome:
    outcome = GenerationOutcome()
    pending: deque[asyncio.Future[Step]] = deque()
    unproductive = 0
    index = 0

    def finished() -> bool:
        return len(outcome.prompts) >= count or unproductive >= patience

    try:
        while not finished():
            while len(pending) < concurrency and not finished():
                pending.append(asyncio.ensure_future(next_call(index, outcome)))
                index += 1
            step = await pending.popleft()
            outcome.teacher_calls += step.calls
            outcome.eliminated.update(step.eliminated)
            texts = step.candidates[: count - len(outcome.prompts)]
            kept = []
            if texts:
                verdicts = await admit(texts)
                kept = [text for text, verdict in zip(texts, verdicts, strict=True) if verdict is None]
                outcome.prompts.extend(kept)
            unproductive = 0 if kept else unproductive + 1
            on_progress(outcome)
        # Calls already started are paid for whether or not they are needed; waiting for them keeps the
        # ledger the same from run to run (and a repeated run finds them in the teacher's cache).
        while pending:
            outcome.teacher_calls += (await pending.popleft()).calls
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    outcome.shortfall = max(0, count - len(outcome.prompts))
    if outcome.shortfall:
        outcome.stopped_reason = (
            f"{patience} teacher calls in a row added no new prompt (all were removed as duplicates or by "
            f"the checks): generated {len(outcome.prompts)} of {count}"
        )
    return outcome
