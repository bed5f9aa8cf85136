"""A real OpenAI-compatible server that no one here wrote as the teacher: llama-cpp-python's server
(the `teacher-server` extra) serving the shipped SmolLM2 GGUF, asked at temperature 0 for top-5
logprobs on prompts with accented, CJK and emoji text. That server names a token that ends inside a
UTF-8 character by text alone ("" or " ", `bytes: null`) and collapses alternatives that read alike,
so ids come from re-tokenising its answers; every one must be exact: the labels spell the answer and
the teacher's own top-1 agrees with them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
from background import background_server
from transformers import AutoTokenizer
from waiting import http_ok, pick_free_port

from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.models.model_loading import EMBEDDED_TEACHER, resolve_model_reference
from stillhouse.teacher.calls import TeacherCallError, TokenIdSource
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.shards import call_for
from stillhouse.teacher.teachers import TeacherPool

pytestmark = pytest.mark.slow

TOP_K = 5
PROMPTS = [
    "Translate to French: I would like a coffee and a croissant, please.",
    "Write the word café three times, separated by commas.",
    "Say 'naïve résumé' and explain the accents in one sentence.",
    "How do you say 'thank you' in Japanese? Answer with the Japanese text.",
    "Repeat exactly: 日本語のテキスト",
    "What does 你好 mean?",
    "Give me three emoji that mean celebration, like 🎉.",
    "Repeat exactly: I love pizza 🍕 and tacos 🌮!",
    "Write a short greeting in German with an umlaut, such as 'schön'.",
    "What is the capital of España? Answer in Spanish.",
    "Repeat exactly: Zürich, Kraków, São Paulo, Reykjavík.",
    "Repeat exactly: 안녕하세요 세계",
    "Write one sentence about the rocket emoji 🚀.",
    "Repeat exactly: 東京タワー and 🗼",
]


@pytest.fixture(scope="module")
def llama_cpp_server(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("llama_cpp.server", reason="needs the teacher-server extra (make test-slow)")
    source = resolve_model_reference(EMBEDDED_TEACHER)
    port = pick_free_port()
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(source.folder / source.gguf_file),
        "--logits_all",
        "true",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--model_alias",
        "smollm2",
    ]
    log_path = tmp_path_factory.mktemp("llama-cpp") / "server.log"
    root = f"http://127.0.0.1:{port}"
    with background_server(
        "llama-cpp-python's server", argv, log_path, lambda: http_ok(f"{root}/v1/models"), timeout=120
    ):
        yield f"{root}/v1"


async def _answers(base_url: str, tokenizer_dir: Path):
    spec = TeacherSpec.model_validate(
        {
            "backend": "openai",
            "model": "smollm2",
            "baseURL": base_url,
            "tokenizer": str(tokenizer_dir),
            "topLogprobs": TOP_K,
            # llama-cpp-python's server applies a repeat penalty of 1.1 by default, even at temperature 0,
            # while it reports the model's unpenalised logprobs: greedy decoding needs it off.
            "sampling": {"temperature": 0, "maxTokens": 48, "extraBody": {"repeat_penalty": 1.0}},
            "limits": {"maxConcurrency": 1, "maxRetries": 0},
        }
    )
    pool = TeacherPool(TeacherSettings(egress_allow=["127.0.0.0/8"]))  # the server is on loopback
    try:
        teacher = await pool.get(spec)
        results = []
        for prompt in PROMPTS:
            call = call_for(spec, [{"role": "user", "content": prompt}], scope="")
            try:
                results.append(await teacher.answer(call, estimated_tokens=200))
            except TeacherCallError as error:
                results.append(error)
        return results
    finally:
        await pool.close()


def test_llama_cpp_server_as_the_teacher_gives_exact_ids(llama_cpp_server: str, tokenizer_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    results = asyncio.run(_answers(llama_cpp_server, tokenizer_dir))

    failures = [result for result in results if isinstance(result, TeacherCallError)]
    assert not failures, failures
    agree = known_positions = masked = slots = stops = positions = non_canonical = 0
    sources = set()
    for answer in results:
        logprobs = answer.logprobs
        sources.add(answer.token_id_source)
        sent = logprobs.num_tokens - int(answer.stop_token_added)
        generated = logprobs.token_ids[:sent].tolist()
        # The labels spell the answer byte for byte, and end with the stop label when one was added.
        assert tokenizer.decode(generated) == answer.text
        if answer.stop_token_added:
            assert logprobs.token_ids[-1] == tokenizer.eos_token_id
            stops += 1
        # The model may generate a split of a word that the tokenizer would not make ("j" "eur" for
        # "jeur"): its labels must be what it generated, so they differ from the text's encoding there.
        non_canonical += generated != tokenizer.encode(answer.text, add_special_tokens=False)
        top_known = logprobs.topk_ids[:sent, 0] != -1
        known_positions += int(top_known.sum())
        agree += int((logprobs.topk_ids[:sent, 0] == logprobs.token_ids[:sent])[top_known].sum())
        masked += answer.masked_alternatives
        slots += sent * TOP_K
        positions += sent
        assert answer.masked_alternatives == int((logprobs.topk_ids[:sent] == -1).sum())
    agreement = agree / known_positions
    mismatches = sum(answer.top1_mismatches for answer in results)
    print(
        f"\nllama.cpp teacher: {len(results)} prompts, 0 failed, {positions} positions, "
        f"ids from {sorted(source.value for source in sources)}; self top-1 agreement {agreement:.4f} "
        f"on {known_positions} positions with a known top alternative; masked alternatives "
        f"{masked}/{slots} = {masked / slots:.2%}; stop labels added {stops}; answers whose generated "
        f"tokens are not the text's own encoding {non_canonical}; "
        f"top-1 mismatches {mismatches}"
    )
    assert sources == {TokenIdSource.RETOKENIZED}
    assert agreement >= 0.99
    assert any(any(ord(character) > 0x2E80 for character in answer.text) for answer in results)
    assert np.mean([answer.finish_reason == "stop" for answer in results]) > 0
