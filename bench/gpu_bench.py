"""GPU training benchmark: a ~0.5B-parameter Llama-shaped student (random weights) trained by
`train_worker` in bf16 for a fixed number of steps, with sparse top-20 forward KL and with plain SFT.
Prints training tokens per second, model FLOPs utilisation and the KD/SFT step-time ratio.

    bench/gpu.sh                      # on a CUDA machine
    bench/gpu.sh --tiny               # anywhere, on the CPU: a tiny model, 3 steps (does it run?)

Model FLOPs per trained token: 6·N (N = the parameters of the matrix products: every weight but the
input embedding; the output layer counts) plus attention, 12·layers·hidden·S (PaLM, appendix B), with S
the packed row length (an upper bound: attention does not cross the examples of a row). Utilisation is
that times tokens per second over the peak: 989 TFLOP/s, dense bf16 of an H100/H200 SXM, or
--peak-tflops. The first step of each run (CUDA warm-up, compilation) is left out. Nothing is
downloaded: the tokenizer is SmolLM2's, read from the embedded teacher's GGUF file (or --tokenizer, a
folder holding one saved on its own), and the data is synthetic (see train_bench.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _table import print_grid, verdict
from train_bench import WORDS, bench_train_run, make_student, synthetic_prompt, write_answers
from transformers import AutoConfig

from stillhouse.common.models.model_loading import EMBEDDED_TEACHER, load_tokenizer_reference
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer.train_loop import train_worker

H100_H200_BF16_DENSE_TFLOPS = 989.0


def matrix_parameters(config) -> int:
    """Weights of the matrix products: attention and MLP projections, and the output layer."""
    hidden = config.hidden_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * per_layer + config.vocab_size * hidden


def model_flops_per_token(config, seq_len: int) -> float:
    return 6 * matrix_parameters(config) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def answer_tokens(tokenizer, response_tokens: int) -> int:
    """Tokens of a synthetic answer once packed, at the most: its chat-formatted prompt (`synthetic_prompt`
    with the longest word and a number longer than any run's) and its response."""
    prompt = synthetic_prompt([max(WORDS, key=len)] * 12, 10**7)
    encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)
    return len(encoded["input_ids"]) + response_tokens


def train(settings, student: Path, kind: str, args, output: str) -> dict[str, float]:
    run = bench_train_run(
        settings,
        student,
        kind,
        args,
        output,
        learning_rate=3e-4,
        micro_batch_tokens=args.micro_batch_tokens,
        compile_model=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    reports: list[dict[str, float]] = []
    started = time.perf_counter()
    train_worker(run, reports.append)
    wall = time.perf_counter() - started
    cumulative = [0.0] + [report["tokens"] for report in reports]
    steps = [
        (cumulative[i + 1] - cumulative[i], report["tokens_per_second"]) for i, report in enumerate(reports)
    ]
    measured = steps[1:] or steps
    tokens = sum(count for count, _ in measured)
    seconds = sum(count / rate for count, rate in measured)
    return {
        "tokens_per_second": tokens / seconds,
        "step_seconds": statistics.median(count / rate for count, rate in measured),
        "final_loss": reports[-1]["loss"],
        "wall_seconds": wall,
        "steps": len(reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="A tiny model for 3 steps on the CPU.")
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per run (one more warms up).")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--response-tokens", type=int, default=448)
    parser.add_argument("--peak-tflops", type=float, default=H100_H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--compile", action="store_true", help="torch.compile the student.")
    parser.add_argument(
        "--tokenizer",
        default=EMBEDDED_TEACHER,
        help="A tokenizer folder or model reference (default: the embedded teacher's).",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Default: the training loop's (on with a GPU).",
    )
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.layers, args.hidden, args.intermediate = 3, 2, 64, 128
        args.batch_tokens, args.micro_batch_tokens, args.max_seq_len, args.response_tokens = 512, 256, 256, 96
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --tiny to check the benchmark on the CPU")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as scratch:
        work = Path(scratch)
        tokenizer = load_tokenizer_reference(args.tokenizer)
        settings = ObjectStoreSettings(backend="local", bucket="bench", local_root=work / "objects")
        store = open_object_store(settings)
        store.ensure_bucket()
        # Enough answers for (steps + 1) steps in one epoch, as many packed into each row as fit.
        rows = (args.steps + 1) * (args.batch_tokens // args.max_seq_len)
        answers = rows * max(1, args.max_seq_len // answer_tokens(tokenizer, args.response_tokens))
        write_answers(store, tokenizer, answers, args.response_tokens)
        student = make_student(
            work / "student",
            tokenizer,
            args.layers,
            args.hidden,
            intermediate=args.intermediate,
            tie_embeddings=False,
        )
        config = AutoConfig.from_pretrained(student)
        flops_per_token = model_flops_per_token(config, args.max_seq_len)
        print(
            f"{device}: Llama {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
            f"vocabulary {config.vocab_size}; {args.batch_tokens} tokens per step, "
            f"rows of {args.max_seq_len}; "
            f"{args.steps + 1} steps per run; {matrix_parameters(config) / 1e6:.0f}M matrix parameters",
            flush=True,
        )
        results = {}
        for kind in ("forward_kl", "sft"):
            results[kind] = train(settings, student, kind, args, f"bench/{kind}")
            print(f"{kind}: {results[kind]}", flush=True)

    rows = []
    for kind, result in results.items():
        utilisation = result["tokens_per_second"] * flops_per_token / (args.peak_tflops * 1e12)
        rows.append(
            [
                kind,
                str(result["steps"]),
                f"{result['tokens_per_second']:.0f}",
                f"{result['step_seconds'] * 1000:.1f}",
                f"{100 * utilisation:.1f}%",
                f"{result['final_loss']:.3f}",
                f"{result['wall_seconds']:.0f}",
            ]
        )
    print_grid(["loss", "steps", "tokens/s", "ms/step", "MFU", "final loss", "run s"], rows)
    ratio = results["forward_kl"]["step_seconds"] / results["sft"]["step_seconds"]
    print_grid(
        ["metric", "ratio", "target", "pass"],
        [["step time, top-20 forward KL / SFT", f"{ratio:.3f}x", "<= 1.15x", verdict(ratio <= 1.15)]],
    )


if __name__ == "__main__":
    main()
