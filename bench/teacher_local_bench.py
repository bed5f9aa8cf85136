"""Local teacher benchmark: generated tokens per second of `LocalHFBackend` (batched, top-20 logprobs
captured at every step) against plain `model.generate` in batches of 8 on the same model and prompts.

The backend runs twice: as configured (its default max_batch_size, the figure that has a target) and
with max_batch_size 8, where both sides run the same model forward on batches of the same size, so the
two should be level: that row shows what capturing logprobs and the batcher cost.

    python bench/teacher_local_bench.py [--prompts 24] [--max-new-tokens 32] [--rounds 3]

Both sides run the embedded SmolLM2-135M-Instruct teacher (one model object, loaded once), greedy, with
the same max_new_tokens, in one process with torch's default threads. Runs alternate (A B, then B A,
...) so that a noisy machine slows both sides alike; each side's figure is its total generated tokens
over its total time. `run()` returns one dict per result row (metric, stillhouse, baseline, ratio,
target, pass); `main()` runs it and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _table import print_grid, verdict

from stillhouse.common.models.model_loading import EMBEDDED_TEACHER
from stillhouse.teacher.backends.local_hf import LocalHFBackend
from stillhouse.teacher.calls import ChatMessage, TeacherCall

BATCH_SIZE = 8
TOP_K = 20

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
    "What is 17 times 23?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I boil an egg?",
    "Name five fruits that are red.",
    "Translate 'good morning' into Spanish and German.",
    "What does a compiler do?",
    "Write a short thank-you note to a teacher.",
    "Why do cats purr?",
    "List the planets of the solar system in order from the Sun.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery by the sea.",
    "How many legs does a spider have?",
    "Describe a rainbow to someone who has never seen one.",
    "What is photosynthesis?",
    "Write one sentence that uses the word 'serendipity'.",
    "Give a simple recipe for pancakes.",
    "Who wrote 'Pride and Prejudice'?",
    "What are the primary colours?",
    "Explain what a prime number is, with an example.",
    "Tell me a fun fact about octopuses.",
]


def _calls(model: str, count: int, max_new_tokens: int) -> list[TeacherCall]:
    return [
        TeacherCall(
            backend="local",
            base_url="",
            model=model,
            revision="",
            messages=(ChatMessage("user", PROMPTS[i % len(PROMPTS)]),),
            temperature=0.0,
            top_p=1.0,
            max_tokens=max_new_tokens,
            seed=None,
            top_logprobs=TOP_K,
        )
        for i in range(count)
    ]


async def _stillhouse_run(backend: LocalHFBackend, calls: list[TeacherCall]) -> tuple[int, float, list]:
    """All calls at once, as the teacher stage makes them: (generated tokens, seconds, token lists)."""
    started = time.perf_counter()
    answers = await asyncio.gather(*(backend.answer(call) for call in calls))
    seconds = time.perf_counter() - started
    tokens = [answer.token_ids.tolist() for answer in answers]
    return sum(answer.completion_tokens for answer in answers), seconds, tokens


def _baseline_run(backend: LocalHFBackend, calls: list[TeacherCall]) -> tuple[int, float, list]:
    """`model.generate` on consecutive batches of 8, left-padded: (generated tokens, seconds, token lists).
    A row's tokens end at its first end-of-sequence token, which counts, as it does for the backend."""
    model, tokenizer = backend.model, backend.tokenizer
    tokenizer.padding_side = "left"
    chats = [
        tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in call.messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        for call in calls
    ]
    max_new_tokens = calls[0].max_tokens
    stops = backend.stop_token_ids
    generated: list[list[int]] = []
    started = time.perf_counter()
    for start in range(0, len(chats), BATCH_SIZE):
        batch = tokenizer(chats[start : start + BATCH_SIZE], return_tensors="pt", padding=True)
        batch = batch.to(model.device)
        with torch.inference_mode():
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            generated.append(row[:end])
    seconds = time.perf_counter() - started
    return sum(len(row) for row in generated), seconds, generated


async def _bench(prompts: int, max_new_tokens: int, rounds: int) -> list[dict]:
    load_started = time.perf_counter()
    backend = LocalHFBackend(EMBEDDED_TEACHER)
    load_seconds = time.perf_counter() - load_started
    default_batch_size = backend.max_batch_size
    calls = _calls(EMBEDDED_TEACHER, prompts, max_new_tokens)

    async def stillhouse(batch_size: int) -> tuple[int, float, list]:
        backend.max_batch_size = batch_size
        return await _stillhouse_run(backend, calls)

    async def baseline() -> tuple[int, float, list]:
        return _baseline_run(backend, calls)

    sides = {
        "same batch size": lambda: stillhouse(BATCH_SIZE),
        "default batch size": lambda: stillhouse(default_batch_size),
        "baseline": baseline,
    }
    totals = {side: [0, 0.0] for side in sides}
    answers: dict[str, list] = {}
    try:
        # Warm-up: first-call costs (allocator, kernels) on both sides, not timed.
        await _stillhouse_run(backend, calls[:BATCH_SIZE])
        _baseline_run(backend, calls[:BATCH_SIZE])
        for round_index in range(rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for side in order:
                tokens, seconds, answers[side] = await sides[side]()
                totals[side][0] += tokens
                totals[side][1] += seconds
    finally:
        await backend.aclose()
    rate = {side: tokens / seconds for side, (tokens, seconds) in totals.items()}

    def row(metric: str, ours: object, theirs: object, ratio: object = "-", target: str = "-", passed=None):
        return {
            "metric": metric,
            "stillhouse": ours,
            "baseline": theirs,
            "ratio": ratio,
            "target": target,
            "pass": passed,
        }

    default_ratio = rate["default batch size"] / rate["baseline"]
    same_ratio = rate["same batch size"] / rate["baseline"]
    rows = [
        row(
            f"generated tokens/s, LocalHFBackend as configured (batches of up to {default_batch_size})",
            round(rate["default batch size"], 1),
            round(rate["baseline"], 1),
            round(default_ratio, 2),
            ">= 1.0x",
            default_ratio >= 1.0,
        ),
        # The same model forward on both sides: parity, within the machine's noise, is what to expect.
        row(
            f"generated tokens/s, LocalHFBackend with max_batch_size {BATCH_SIZE} (parity check)",
            round(rate["same batch size"], 1),
            round(rate["baseline"], 1),
            round(same_ratio, 2),
            "~1.0x",
        ),
    ]
    same = sum(a == b for a, b in zip(answers["same batch size"], answers["baseline"], strict=True))
    return [
        *rows,
        row("greedy answers identical to model.generate's", f"{same}/{len(calls)}", "-"),
        row(
            f"generated tokens per run ({prompts} prompts, max {max_new_tokens} new tokens)",
            totals["same batch size"][0] // rounds,
            totals["baseline"][0] // rounds,
        ),
        row("teacher load seconds", round(load_seconds, 1), "-"),
    ]


def run(prompts: int = 24, max_new_tokens: int = 32, rounds: int = 3) -> list[dict]:
    return asyncio.run(_bench(prompts, max_new_tokens, rounds))


def print_table(results: list[dict]) -> None:
    headers = ["metric", "stillhouse", "baseline", "ratio", "target", "pass"]
    print_grid(
        headers, [[str(row[name]) for name in headers[:-1]] + [verdict(row["pass"])] for row in results]
    )
    print()
    print(
        f"stillhouse: LocalHFBackend with max_batch_size {BATCH_SIZE}, then its default; all calls in "
        f"flight at once, top-{TOP_K} logprobs of every generated token captured. baseline: "
        f"model.generate(do_sample=False) on consecutive batches of {BATCH_SIZE}, left-padded, no "
        f"logprobs. Same model object, torch threads: {torch.get_num_threads()}."
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results = run(args.prompts, args.max_new_tokens, args.rounds)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
