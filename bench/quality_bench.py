"""Quality benchmark, on the CPU: what each distillation loss buys, at equal steps and tokens, beside the
references a sceptic would pick.

    cd bench && ../.venv/bin/python quality_bench.py [--prompts 96] [--max-tokens 48] [--layers 8]
                                                     [--epochs 2] [--on-policy 0.25] [--unlikelihood 1]

1. The embedded teacher (SmolLM2-135M-Instruct) answers template prompts ("Explain {concept} to
   {audience}, {style}.", the demo's seed lists) greedily, with its top-20 logprobs, as the local teacher
   backend does. The prompts of `--holdout-fraction` of the concepts are held out: no held-out prompt
   shares its concept with a training prompt.
2. One student, the teacher cut to `--layers` decoder layers (chosen by their influence on the
   training answers, as a job's are by default), is trained by `train_worker` (the training loop every
   job runs) once per loss: `sft` (cross-entropy on the teacher's text), `forward_kl`, `forward_kl` with
   token-level unlikelihood (`--unlikelihood`, its weight), `reverse_kl`, `jsd` (beta 0.5) on the stored
   top-20, and `forward_kl` with on-policy batches (a share of the steps on the student's own
   generations, scored by the teacher's full logits). Same seed, same batches, same steps; every KD row
   has ceWeight 0, so it learns from the teacher's distribution alone.
3. Each student is evaluated by `run_evaluation` (the evaluate stage) on the held-out answers, which also
   gives the reference rows: uniform, the unigram fitted on the training answers, the untrained student
   and the teacher.

Target: the best KD row beats SFT on held-out KL and on top-1 agreement. Beside it, the least repetitive
KD row's share of repeated 4-grams in greedy answers against the teacher's (the demo's bound is twice).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _table import print_grid, summary_figure, verdict

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import answers_schema, prompt_id
from stillhouse.common.datasets.store import DatasetWriter
from stillhouse.common.models.generation import DecodeRequest, default_stop_ids, generate_batch
from stillhouse.common.models.model_loading import (
    EMBEDDED_TEACHER,
    load_model,
    load_tokenizer,
    resolve_model_reference,
)
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.teacher.calls import TeacherAnswer, TokenIdSource
from stillhouse.teacher.shards import answers_table
from stillhouse.trainer.evaluation import run_evaluation
from stillhouse.trainer.run_config import EvaluateRun, TrainRun
from stillhouse.trainer.train_loop import train_worker

SEEDS = Path(__file__).parents[1] / "examples" / "seeds"
TOP_K = 20
TRAIN_DATASET = "bench/teacher/train"
HOLDOUT_DATASET = "bench/teacher/holdout"
TEACHER = {
    "backend": "local",
    "model": EMBEDDED_TEACHER,
    "sampling": {"temperature": 0.0},
    "topLogprobs": TOP_K,
}
METRICS = (
    ("kl", "KL", "{:.3f}"),
    ("top1_agreement", "top-1", "{:.3f}"),
    ("perplexity", "ppl", "{:.1f}"),
    ("token_f1", "F1", "{:.3f}"),
    ("repeated_4grams", "rep 4-grams", "{:.3f}"),
)


def template_prompts(count: int, holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): `count` combinations of the seed lists in a seeded order, the
    prompts of `holdout_fraction` of the concepts, chosen at random, held out."""
    lists = [(SEEDS / f"{name}.txt").read_text().split("\n") for name in ("concepts", "audiences", "styles")]
    concepts, audiences, styles = ([value.strip() for value in values if value.strip()] for values in lists)
    combinations = list(itertools.product(concepts, audiences, styles))
    generator = random.Random(seed)
    generator.shuffle(combinations)
    held_out = set(generator.sample(concepts, round(holdout_fraction * len(concepts))))
    train, holdout = [], []
    for concept, audience, style in combinations[:count]:
        (holdout if concept in held_out else train).append(f"Explain {concept} to {audience}, {style}.")
    return train, holdout


def write_teacher_answers(store, prompts: list[str], dataset: str, max_tokens: int, batch: int = 16) -> float:
    """The teacher's greedy answers to `prompts`, with their top-20, as the teacher stage stores them;
    the seconds the teacher took."""
    source = resolve_model_reference(EMBEDDED_TEACHER)
    tokenizer = load_tokenizer(source)
    model = load_model(source, torch.device("cpu"))
    stops = default_stop_ids(model, tokenizer)
    chats, answers = [], []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        messages = [[{"role": "user", "content": text}] for text in prompts[start : start + batch]]
        prompt_ids = [
            tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
            for chat in messages
        ]
        requests = [DecodeRequest(list(ids), max_tokens, top_logprobs=TOP_K) for ids in prompt_ids]
        for chat, ids, decoded in zip(
            messages,
            prompt_ids,
            generate_batch(model, requests, stops, tokenizer.pad_token_id or 0),
            strict=True,
        ):
            text = tokenizer.decode(decoded.token_ids, skip_special_tokens=True)
            chats.append({"prompt_id": prompt_id(chat), "messages": chat})
            answers.append(
                TeacherAnswer(
                    text,
                    decoded.finish_reason,
                    len(ids),
                    len(decoded.token_ids),
                    0.0,
                    decoded.logprobs,
                    TokenIdSource.LOCAL,
                )
            )
    seconds = time.perf_counter() - started
    schema = answers_schema(TOP_K)
    with DatasetWriter(store, dataset, schema, Lineage(job_id="bench", stage="teacher")) as writer:
        writer.write_batch(answers_table(chats, answers, schema, TOP_K))
        writer.commit()
    return seconds


def variants(on_policy: float, unlikelihood: float) -> dict[str, dict]:
    """The training spec's loss (and on-policy) of each row."""
    return {
        "sft": {"loss": {"kind": "sft"}},
        "forward_kl": {"loss": {"kind": "forward_kl"}},
        "forward_kl + unlikelihood": {"loss": {"kind": "forward_kl", "unlikelihoodWeight": unlikelihood}},
        "reverse_kl": {"loss": {"kind": "reverse_kl"}},
        "jsd": {"loss": {"kind": "jsd", "beta": 0.5}},
        "on-policy forward_kl": {
            "loss": {"kind": "forward_kl"},
            "onPolicy": {"fraction": on_policy, "maxNewTokens": 48, "temperature": 1.0},
        },
    }


def train_and_evaluate(settings, name: str, training: dict, args) -> tuple[dict, dict, float]:
    """(the report's metrics by row, the training outcome's figures, seconds) of one variant."""
    output = f"bench/{name.replace(' ', '-')}"
    run = TrainRun.model_validate(
        {
            "job_id": "bench",
            "answers_dataset_id": TRAIN_DATASET,
            "object_store": settings,
            "teacher": TEACHER,
            "student": {"init": {"pruneTeacherDepth": args.layers}},
            "training": {
                **training,
                "epochs": args.epochs,
                "learningRate": args.learning_rate,
                "batchTokens": args.batch_tokens,
                "maxSeqLen": 256,
                "checkpointEverySteps": 1_000_000,
                "seed": args.seed,
            },
            "output_prefix": f"{output}/train",
        }
    )
    started = time.perf_counter()
    outcome = train_worker(run, lambda figures: None)
    seconds = time.perf_counter() - started
    evaluation = EvaluateRun(
        job_id="bench",
        student_prefix=run.student_prefix,
        baseline_prefix=run.baseline_prefix,
        holdout_dataset_id=HOLDOUT_DATASET,
        training_dataset_id=TRAIN_DATASET,
        teacher=TEACHER,
        evaluation={"maxNewTokens": args.max_tokens},
        object_store=settings,
        output_prefix=f"{output}/evaluate",
    )
    result = run_evaluation(evaluation, lambda *_: None)
    metrics = {
        "student": result.student_metrics,
        "baseline": result.baseline_metrics,
        "teacher": result.teacher_metrics,
        **result.reference_metrics,
    }
    return (
        metrics,
        {"steps": outcome.steps, "tokens": outcome.tokens, "on_policy": outcome.on_policy_steps},
        seconds,
    )


def _cells(figures: dict) -> list[str]:
    return [form.format(figures[key]) if figures.get(key) is not None else "n/a" for key, _, form in METRICS]


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    train_prompts, holdout_prompts = template_prompts(args.prompts, args.holdout_fraction, args.seed)
    if not holdout_prompts:
        raise SystemExit(
            f"--holdout-fraction {args.holdout_fraction} holds out none of the {args.prompts} prompts"
        )
    with tempfile.TemporaryDirectory(prefix="stillhouse-quality-bench-") as scratch:
        settings = ObjectStoreSettings(backend="local", local_root=Path(scratch) / "objects")
        store = open_object_store(settings)
        teacher_seconds = write_teacher_answers(store, train_prompts, TRAIN_DATASET, args.max_tokens)
        teacher_seconds += write_teacher_answers(store, holdout_prompts, HOLDOUT_DATASET, args.max_tokens)
        print(
            f"teacher: {len(train_prompts)} training and {len(holdout_prompts)} held-out prompts answered "
            f"in {teacher_seconds:.0f} s",
            flush=True,
        )
        results: dict[str, dict] = {}
        references: dict[str, dict] = {}
        for name, training in variants(args.on_policy, args.unlikelihood).items():
            metrics, outcome, seconds = train_and_evaluate(settings, name, training, args)
            results[name] = {**metrics["student"], **outcome, "seconds": seconds}
            references = {key: value for key, value in metrics.items() if key != "student"}
            print(
                f"{name}: {outcome['steps']} steps, {outcome['tokens']} tokens, {seconds:.0f} s", flush=True
            )

    headers = ["row", *(label for _, label, _ in METRICS), "steps", "tokens", "train s"]
    rows = [
        [label, *_cells(references.get(key, {})), "", "", ""]
        for key, label in (("uniform", "uniform"), ("unigram", "unigram"), ("baseline", "untrained"))
    ]
    rows += [
        [name, *_cells(figures), str(figures["steps"]), str(figures["tokens"]), f"{figures['seconds']:.0f}"]
        for name, figures in results.items()
    ]
    rows.append(["teacher", *_cells(references.get("teacher", {})), "", "", ""])
    print()
    print_grid(headers, rows)

    sft = results["sft"]
    kd_rows = {name: figures for name, figures in results.items() if name != "sft"}
    best = min(kd_rows, key=lambda name: kd_rows[name]["kl"])
    beats_kl = kd_rows[best]["kl"] < sft["kl"]
    beats_top1 = kd_rows[best]["top1_agreement"] > sft["top1_agreement"]
    least_repetitive = min(kd_rows, key=lambda name: kd_rows[name]["repeated_4grams"])
    teacher_repetition = references.get("teacher", {}).get("repeated_4grams", 0.0)
    least_repetition = kd_rows[least_repetitive]["repeated_4grams"]
    equal_tokens = (
        len({figures["tokens"] for name, figures in results.items() if "on-policy" not in name}) == 1
    )
    summary = [
        {
            "metric": f"best KD row ({best}) KL / SFT KL",
            "ratio": kd_rows[best]["kl"] / sft["kl"],
            "target": "< 1",
            "passed": beats_kl,
        },
        {
            "metric": f"best KD row ({best}) top-1 - SFT top-1",
            "value": kd_rows[best]["top1_agreement"] - sft["top1_agreement"],
            "format": "{:+.4f}",
            "target": "> 0",
            "passed": beats_top1,
        },
        {
            # Compared, not divided: on a few held-out answers the teacher may repeat no 4-gram at all.
            "metric": f"least repetitive KD row ({least_repetitive}) rep 4-grams, at most 2x the teacher's",
            "value": least_repetition,
            "format": "{:.3f}",
            "target": f"<= {2 * teacher_repetition:.3f}",
            "passed": least_repetition <= 2 * teacher_repetition,
        },
        {
            "metric": "off-policy rows trained on equal tokens",
            "value": equal_tokens,
            "target": "yes",
            "passed": equal_tokens,
        },
    ]
    print()
    print_grid(
        ["target", "value", "target", "met"],
        [
            [
                row["metric"],
                summary_figure(row),
                row["target"],
                verdict(row["passed"]),
            ]
            for row in summary
        ],
    )
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96, help="template prompts, before the held-out split")
    parser.add_argument(
        "--holdout-fraction", type=float, default=0.1, help="share of the seed concepts held out"
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="teacher answer and greedy answer length")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers the student keeps of 30")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--on-policy", type=float, default=0.25, help="share of on-policy steps (lambda)")
    parser.add_argument(
        "--unlikelihood",
        type=float,
        default=1.0,
        help="unlikelihoodWeight of the forward KL + unlikelihood row",
    )
    parser.add_argument("--seed", type=int, default=7)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
