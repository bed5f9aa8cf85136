"""The tiny job: a whole distillation job on a tiny random teacher, seconds per stage (Ray's start-up
dominates). Its prompt files are written beside it, so a platform must let jobs read that folder
(`stillhouse up --input-root FOLDER`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEEDS = [
    "Explain what a hash table is.",
    "Write a haiku about rain.",
    "Give three tips for clear writing.",
    "What is a process?",
    "Name a famous painting.",
    "How do plants grow?",
    "What is the capital of France?",
    "Describe the sea at night.",
]
TOPICS = ["rivers", "stars", "bread", "clocks", "bees"]


def write_prompt_files(folder: Path) -> tuple[Path, Path]:
    """The seed prompts (JSONL) and the topics slot file, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = folder / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": seed}) + "\n" for seed in SEEDS))
    topics = folder / "topics.txt"
    topics.write_text("".join(f"{topic}\n" for topic in TOPICS))
    return seeds, topics


def tiny_job_spec(teacher: Path, inputs: Path, name: str = "tiny-end-to-end") -> dict[str, Any]:
    """The tiny job on the `teacher` model folder, its prompt files written into `inputs` (absolute
    paths, so the spec can be sent from anywhere)."""
    seeds, topics = write_prompt_files(inputs)
    return {
        "apiVersion": "stillhouse.dev/v1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "prompts": {
                "sources": [{"path": str(seeds)}],
                "generate": {
                    "strategy": "template",
                    "count": 30,
                    "template": "Tell me {{ what }} about {{ topic }}.",
                    "slots": {"what": ["a fact", "a story", "a joke", "a secret", "a question", "a poem"]},
                    "slotFiles": {"topic": str(topics)},
                },
                "seed": 3,
            },
            "teacher": {
                "backend": "local",
                "model": str(teacher),
                "sampling": {"temperature": 0.0, "maxTokens": 12},
                "topLogprobs": 8,
            },
            "student": {"init": {"pruneTeacherDepth": 1}},
            "training": {
                "loss": {"kind": "forward_kl", "ceWeight": 0.5},
                "epochs": 2,
                "learningRate": 1.0e-3,
                "batchTokens": 1024,
                "maxSeqLen": 128,
                "workers": 1,
            },
            "evaluation": {"holdoutFraction": 0.2, "maxNewTokens": 12},
        },
    }
