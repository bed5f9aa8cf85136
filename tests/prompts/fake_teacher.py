"""A teacher service (the Teacher contract's `Complete`) with canned answers, for prompt generation tests.

    python tests/prompts/fake_teacher.py PORT CALLS_FILE SERVICE_TOKEN_FILE

Answers are a pure function of the request (its messages and sampling seed), so a run is repeatable:
- a Self-Instruct request (asks for a numbered list) gets five numbered instructions: three new ones
  drawn from a bank of topics and audiences, one about an attached image (the generator must drop it)
  and one copied from the examples it was shown (a duplicate for the cleaner to remove);
- an Evol-Instruct request (`#The Given Prompt#` / `#Given Prompt#`) gets, by the seed: a refusal, a
  reply that copies the template's markers, the given prompt unchanged, or a real rewrite (7 in 10).
The model named in `spec.teacher` picks other behaviours: `fake-repeating` gives the same answer to
every request, whatever its seed; `fake-missing` fails every call with FAILED_PRECONDITION, as the teacher
service does for a model the backend does not serve.

Each call is appended to CALLS_FILE as one JSON line: model, seed, temperature, kind, job_id.
Every response carries a Ledger: one request, a token per word, 1 USD per million prompt tokens and 2
per million completion tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stillhouse.common.service_auth import ServiceTokenInterceptor
from stillhouse.common.service_credentials import read_service_tokens
from stillhouse.teacher.v1 import teacher_pb2, teacher_pb2_grpc

VERBS = ["Explain", "Summarise", "Compare", "Plan", "Describe", "Teach", "Outline", "Critique", "Write about"]
TOPICS = [
    "photosynthesis", "compound interest", "the French revolution", "sourdough baking", "binary search",
    "plate tectonics", "jazz improvisation", "vaccine trials", "container shipping", "chess openings",
    "urban beekeeping", "tax brackets", "the water cycle", "solar panels", "medieval castles",
    "sleep hygiene", "public speaking", "volcano formation", "supply chains", "marathon training",
]  # fmt: skip
AUDIENCES = [
    "a curious ten-year-old", "a retired engineer", "first-year nursing students", "a busy startup founder",
    "a museum visitor", "a high-school debate team", "a new city council member", "an amateur astronomer",
]  # fmt: skip
STYLES = [
    "in three short paragraphs", "as a numbered checklist", "with one concrete everyday example",
    "using a simple analogy", "in under one hundred words", "as a friendly dialogue",
]  # fmt: skip
CONSTRAINTS = [
    "cite two common misconceptions", "end with a short quiz question", "avoid any technical jargon",
    "include a worked numerical example", "mention one historical milestone", "finish with a practical tip",
    "compare it with a neighbouring idea", "name a typical beginner mistake",
]  # fmt: skip

_START = re.compile(r"numbered list starting at (\d+)")
_EXAMPLE = re.compile(r"^\d+\. (.*)$", re.MULTILINE)
_GIVEN = re.compile(r"#(?:The )?Given Prompt#:\n(.*)\n#(?:Rewritten|Created) Prompt#:", re.DOTALL)


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _instruction(rng: random.Random) -> str:
    return f"{rng.choice(VERBS)} {rng.choice(TOPICS)} for {rng.choice(AUDIENCES)} {rng.choice(STYLES)}."


def self_instruct_reply(content: str, seed: int) -> str:
    start = int(_START.search(content).group(1))
    examples = _EXAMPLE.findall(content.split("\n\nWrite ")[0])
    rng = _rng("self_instruct", seed)
    items = [_instruction(rng) for _ in range(3)]
    topic, audience = rng.choice(TOPICS), rng.choice(AUDIENCES)
    items.append(f"Describe the attached image of {topic} in detail for {audience}.")
    items.append(rng.choice(examples))
    return "\n".join(f"{start + offset}. {item}" for offset, item in enumerate(items))


def evol_reply(content: str, seed: int) -> str:
    given = _GIVEN.search(content).group(1).strip()
    rng = _rng("evol", seed)
    outcome = seed % 10
    if outcome == 0:
        return "Sorry, I cannot help with rewriting that."
    if outcome == 1:
        return f"#Rewritten Prompt#: {given} Give more detail."
    if outcome == 2:
        return given
    if "#Created Prompt#" in content:
        return f"{_instruction(rng)[:-1]} and {rng.choice(CONSTRAINTS)}."
    constraint, audience, style = rng.choice(CONSTRAINTS), rng.choice(AUDIENCES), rng.choice(STYLES)
    return f"{given} Also {constraint}, written for {audience} {style}."


class FakeTeacher(teacher_pb2_grpc.TeacherServicer):
    def __init__(self, calls_file: Path) -> None:
        self._calls = calls_file.open("a")

    async def Complete(self, request, context):
        teacher = json_format.MessageToDict(request.teacher)
        model, sampling = teacher["model"], teacher.get("sampling", {})
        seed = int(sampling.get("seed", 0))
        content = request.messages[-1].content
        kind = "chat"
        if _START.search(content):
            kind = "self_instruct"
        elif _GIVEN.search(content):
            kind = "evol_instruct"
        record = {
            "model": model,
            "seed": seed,
            "temperature": sampling.get("temperature"),
            "kind": kind,
            "job_id": request.job_id,
        }
        self._calls.write(json.dumps(record) + "\n")
        self._calls.flush()
        if model == "fake-missing":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "the teacher 'fake-missing': model not found (404)"
            )
        if model == "fake-repeating":
            seed = 3
        if kind == "self_instruct":
            text = self_instruct_reply(content, seed)
        elif kind == "evol_instruct":
            text = evol_reply(content, seed)
        else:
            text = "Hello."
        prompt_tokens = sum(len(message.content.split()) for message in request.messages)
        completion_tokens = len(text.split())
        ledger = teacher_pb2.Ledger(
            requests=1,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=(prompt_tokens + 2 * completion_tokens) / 1e6,
        )
        return teacher_pb2.CompleteResponse(text=text, finish_reason="stop", ledger=ledger)


async def serve(port: int, calls_file: Path, token_file: Path) -> None:
    # Checks callers as the real teacher service does, so the prompts service must send the token.
    server = grpc.aio.server(interceptors=[ServiceTokenInterceptor(read_service_tokens(token_file))])
    teacher_pb2_grpc.add_TeacherServicer_to_server(FakeTeacher(calls_file), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
