"""Training benchmark, on the CPU: what the Stillhouse training loop costs over a plain PyTorch loop, and
what distilling from stored top-20 logprobs costs over plain SFT.

    cd bench && ../.venv/bin/python train_bench.py [--steps 6] [--rounds 3] [--layers 4] [--hidden 128]

1. Training tokens per second of `train_worker` (world size 1: packing, the loss module, gradient
   clipping, the scheduler; its own per-step figures, which leave out the checkpoint and artifact uploads
   around the loop) against a plain loop written here (forward, cross-entropy, backward, AdamW step) on
   the same model, the same packed batches and the same batch size, both with SFT. Target: at least 0.95x.
2. Step time of `train_worker` with sparse top-20 forward KL over the same with SFT: same model, same
   batches. Target: at most 1.15x.
3. Training tokens per second of `train_worker` with `training.precision: bf16` (autocast) over
   `fp32`, SFT. Target, on a CPU with AMX or AVX512-BF16 (where `auto` picks bf16) and a student as
   wide as a real one (`--hidden` 512 or more, e.g. `--layers 8 --hidden 576`): at least 1.2x. The
   default model is too narrow for its matrices to pay for the casts (about 1.1x), so there the ratio is
   shown only.

Sides 1 and 2 train in float32, as the plain loop does.

The model is a Llama of a few layers with SmolLM2's vocabulary (49,152 tokens, the tokenizer read from
the embedded teacher's GGUF file), so that the output layer and the loss over the vocabulary cost what
they cost in a real student. The answers dataset is synthetic: random response tokens with a made-up
top-20 distribution at each, written in the teacher stage's layout. Each round runs every side once,
in an order that alternates between rounds; each side's figure is the median over rounds of its
tokens over its time, the first step of each run (warm-up) left out. A ratio is the median of the
ratios within each round: the two sides of a round ran back to back, so a busy machine slows both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from _table import print_grid, verdict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import answers_schema, prompt_id
from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs
from stillhouse.common.datasets.store import DatasetWriter
from stillhouse.common.models.model_loading import EMBEDDED_TEACHER, load_tokenizer, resolve_model_reference
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.teacher.calls import TeacherAnswer
from stillhouse.teacher.shards import answers_table
from stillhouse.trainer.data import BatchPlan, collate
from stillhouse.trainer.precision import cpu_has_bf16_matrix_units
from stillhouse.trainer.run_config import TrainRun
from stillhouse.trainer.train_loop import ADAMW_BETAS, WEIGHT_DECAY, train_worker
from stillhouse.trainer.worker_data import WorkerData

TOP_K = 20
DATASET = "bench/teacher/train"
LEARNING_RATE = 1e-3
BF16_TARGET_MIN_HIDDEN = 512
WORDS = ["the", "a", "cat", "dog", "sea", "rain", "bread", "music", "train", "river", "sun", "moon", "tree"]


def synthetic_prompt(words, index: int) -> list[dict[str, str]]:
    """The chat of synthetic answer `index`: 12 of `WORDS` and its number."""
    return [{"role": "user", "content": " ".join(words) + f" {index}"}]


def write_answers(store, tokenizer, rows: int, response_tokens: int, seed: int = 0) -> None:
    """Synthetic teacher answers: random response tokens, each with a top-20 holding it first and 90%
    of the mass."""
    generator = np.random.default_rng(seed)
    chats, answers = [], []
    probabilities = 0.9 * np.exp(-np.arange(TOP_K) / 3.0)
    probabilities *= 0.9 / probabilities.sum()
    for index in range(rows):
        messages = synthetic_prompt(generator.choice(WORDS, 12), index)
        tokens = generator.integers(1000, 40000, response_tokens).astype(np.int32)
        topk = generator.integers(1000, 40000, (response_tokens, TOP_K)).astype(np.int32)
        topk[:, 0] = tokens
        logprobs = SparseLogprobs(
            tokens,
            topk,
            np.tile(np.log(probabilities), (response_tokens, 1)).astype(np.float32),
            np.full(response_tokens, np.log(0.1), np.float32),
        )
        chats.append({"prompt_id": prompt_id(messages), "messages": messages})
        answers.append(TeacherAnswer(tokenizer.decode(tokens), "length", 40, response_tokens, 0.0, logprobs))
    schema = answers_schema(TOP_K)
    with DatasetWriter(store, DATASET, schema, Lineage(job_id="bench", stage="teacher")) as writer:
        writer.write_batch(answers_table(chats, answers, schema, TOP_K))
        writer.commit()


def make_student(
    folder: Path,
    tokenizer,
    layers: int,
    hidden: int,
    *,
    intermediate: int | None = None,
    tie_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random Llama over the tokenizer's vocabulary, saved with it (heads of 64 dimensions)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bench_train_run(
    settings,
    student: Path,
    kind: str,
    args,
    output: str,
    learning_rate: float,
    precision: str = "auto",
    **run_options,
) -> TrainRun:
    """The run a benchmark trains: `student` on DATASET for `args.batch_tokens` a step, rows of
    `args.max_seq_len`, no warm-up and no checkpoints, a report every step."""
    return TrainRun.model_validate(
        {
            "job_id": "bench",
            "answers_dataset_id": DATASET,
            "object_store": settings,
            # The student itself as the local teacher: the same tokenizer, so stored logprobs line up.
            "teacher": {"backend": "local", "model": str(student)},
            "student": {"init": {"pretrained": str(student)}},
            "training": {
                "loss": {"kind": kind},
                "learningRate": learning_rate,
                "batchTokens": args.batch_tokens,
                "maxSeqLen": args.max_seq_len,
                "warmupRatio": 0.0,
                "checkpointEverySteps": 1_000_000,
                "precision": precision,
            },
            "output_prefix": output,
            "report_every_steps": 1,
            **run_options,
        }
    )


def stillhouse_run(
    settings, student: Path, kind: str, args, output: str, precision: str = "fp32"
) -> tuple[int, float]:
    """Tokens and seconds of `train_worker`'s steps after the first."""
    run = bench_train_run(settings, student, kind, args, output, LEARNING_RATE, precision=precision)
    reports: list[dict[str, float]] = []
    train_worker(run, reports.append)
    cumulative = [0.0] + [report["tokens"] for report in reports]
    window = [
        (cumulative[index + 1] - cumulative[index], report["tokens_per_second"])
        for index, report in enumerate(reports)
    ][1 : args.steps + 1]
    return int(sum(tokens for tokens, _ in window)), sum(tokens / rate for tokens, rate in window)


def plain_batches(store, tokenizer, args, work: Path) -> list:
    """The batches `train_worker` trains on (same packing, same order), as tensors."""
    shuffle_buffer = TrainRun.model_fields["shuffle_buffer_examples"].default
    data = WorkerData.load(
        store,
        DATASET,
        tokenizer,
        rank=0,
        world=1,
        use_teacher_tokens=True,
        require_teacher=False,
        max_seq_len=args.max_seq_len,
        seed=0,
        work_dir=work / "plain-data",
        shuffle_buffer=shuffle_buffer,
    )
    plan = BatchPlan.create(args.batch_tokens, args.max_seq_len, 1, 8192)
    steps = zip(range(plan.steps_per_epoch(data.packed_row_count(0))), data.steps(0, plan), strict=False)
    pad = tokenizer.pad_token_id
    return [
        collate(step.examples, micro, pad_token_id=pad, teacher_k=None)
        for _, step in steps
        for micro in step.micro_batches
    ]


def plain_run(student: Path, batches: list, steps: int) -> tuple[int, float]:
    """A nanoGPT-style loop: forward, cross-entropy, backward, AdamW step."""
    model = AutoModelForCausalLM.from_pretrained(student)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, betas=ADAMW_BETAS, weight_decay=WEIGHT_DECAY
    )
    tokens, seconds = 0, 0.0
    for index, batch in enumerate(batches[: steps + 1]):
        started = time.perf_counter()
        logits = model(input_ids=batch.input_ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index > 0:  # the first step warms up
            seconds += time.perf_counter() - started
            tokens += batch.tokens
    return tokens, seconds


def run(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="train-bench-") as scratch:
        work = Path(scratch)
        tokenizer = load_tokenizer(resolve_model_reference(EMBEDDED_TEACHER))
        settings = ObjectStoreSettings(backend="local", bucket="bench", local_root=work / "objects")
        store = open_object_store(settings)
        store.ensure_bucket()
        # One answer per row (prompt and response fill more than half of it): steps + 1 steps in all.
        write_answers(
            store, tokenizer, (args.steps + 1) * (args.batch_tokens // args.max_seq_len), args.response_tokens
        )
        student = make_student(work / "student", tokenizer, args.layers, args.hidden)
        batches = plain_batches(store, tokenizer, args, work)
        assert len(batches) > args.steps, "not enough data for the steps asked for"

        sides = {
            "stillhouse_sft": lambda output: stillhouse_run(settings, student, "sft", args, output),
            "stillhouse_kd": lambda output: stillhouse_run(settings, student, "forward_kl", args, output),
            "plain_sft": lambda output: plain_run(student, batches, args.steps),
            "stillhouse_sft_bf16": lambda output: stillhouse_run(
                settings, student, "sft", args, output, precision="bf16"
            ),
        }
        rates: dict[str, list[float]] = {name: [] for name in sides}
        step_seconds: dict[str, list[float]] = {name: [] for name in sides}
        for round_index in range(args.rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for name in order:
                tokens, seconds = sides[name](f"bench/{name}/{round_index}")
                rates[name].append(tokens / seconds)
                step_seconds[name].append(seconds / args.steps)
                print(f"round {round_index + 1}: {name:15} {tokens / seconds:8.0f} tokens/s", flush=True)

    rate = {name: statistics.median(values) for name, values in rates.items()}
    step = {name: statistics.median(values) for name, values in step_seconds.items()}
    # Ratios within a round (the sides ran back to back, under the same load), then their median.
    loop_ratio = statistics.median(
        ours / plain for ours, plain in zip(rates["stillhouse_sft"], rates["plain_sft"], strict=True)
    )
    kd_ratio = statistics.median(
        kd / sft
        for kd, sft in zip(step_seconds["stillhouse_kd"], step_seconds["stillhouse_sft"], strict=True)
    )
    bf16_ratio = statistics.median(
        bf16 / fp32 for bf16, fp32 in zip(rates["stillhouse_sft_bf16"], rates["stillhouse_sft"], strict=True)
    )
    bf16_target = cpu_has_bf16_matrix_units() and args.hidden >= BF16_TARGET_MIN_HIDDEN
    return [
        {
            "metric": "train tokens/s, Stillhouse loop vs plain loop (SFT)",
            "stillhouse": rate["stillhouse_sft"],
            "baseline": rate["plain_sft"],
            "ratio": loop_ratio,
            "target": ">= 0.95x",
            "pass": loop_ratio >= 0.95,
        },
        {
            "metric": "seconds per step, top-20 forward KL vs SFT (both Stillhouse)",
            "stillhouse": step["stillhouse_kd"],
            "baseline": step["stillhouse_sft"],
            "ratio": kd_ratio,
            "target": "<= 1.15x",
            "pass": kd_ratio <= 1.15,
        },
        {
            "metric": f"train tokens/s, bf16 autocast vs float32 (SFT, hidden {args.hidden})",
            "stillhouse": rate["stillhouse_sft_bf16"],
            "baseline": rate["stillhouse_sft"],
            "ratio": bf16_ratio,
            "target": ">= 1.2x" if bf16_target else "shown only",
            "pass": bf16_ratio >= 1.2 if bf16_target else True,
        },
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=6, help="Measured steps per run (after one warm-up step)."
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    print(
        f"model: Llama, {args.layers} layers, hidden {args.hidden}, vocabulary 49152; "
        f"{args.batch_tokens} tokens per step, rows of {args.max_seq_len}; "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = run(args)
    print_grid(
        ["metric", "stillhouse", "baseline", "ratio", "target", "pass"],
        [
            [
                row["metric"],
                f"{row['stillhouse']:.3g}",
                f"{row['baseline']:.3g}",
                f"{row['ratio']:.3f}x",
                row["target"],
                verdict(row["pass"]),
            ]
            for row in rows
        ],
    )
    return rows


if __name__ == "__main__":
    main()
