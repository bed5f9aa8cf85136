"""A real OpenAI-compatible server that no one here wrote as the teacher: llama-cpp-python's server
(the `teacher-server` extra) serving the shipped SmolLM2 GGUF, asked at temperature 0 for top-5
logprobs on prompts with accented, CJK and emoji text. That server names a token that ends inside a
UTF-8 character by text alone ("" or " ", `bytes: null`) and collapses alternatives that read alike,
so ids come from re-tokenising its answers; every one must be exact: the labels are the very ids that
llama.cpp picked (read inside llama.cpp, from the same GGUF), they spell the answer, and the teacher's own
top-1 agrees with them."""

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


def _gguf_path() -> Path:
    source = resolve_model_reference(EMBEDDED_TEACHER)
    return source.folder / source.gguf_file


@pytest.fixture(scope="module")
def llama_cpp_server(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("llama_cpp.server", reason="needs the teacher-server extra (make test-slow)")
    port = pick_free_port()
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(_gguf_path()),
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


def _greedy_token_ids() -> list[list[int]]:
    """The ids the same GGUF picks for each prompt, read inside llama.cpp itself: its chat completion, as
    the server runs it, with a hook that sees every decoding step's logits and the ids fed in so far."""
    from llama_cpp import Llama, LogitsProcessorList

    llama = Llama(model_path=str(_gguf_path()), n_ctx=2048, logits_all=True, verbose=False)
    picked = []
    for prompt in PROMPTS:
        steps: list[tuple[list[int], int]] = []

        def record(input_ids, scores, steps=steps):
            steps.append((input_ids.tolist(), int(np.argmax(scores))))
            return scores

        llama.create_chat_completion(
            [{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=48,
            repeat_penalty=1.0,
            logits_processor=LogitsProcessorList([record]),
        )
        prompt_length = len(steps[0][0])
        fed, last = steps[-1]
        # At temperature 0 each step takes its argmax, which the next step is fed.
        assert fed[prompt_length:] == [best for _, best in steps[:-1]]
        picked.append([*fed[prompt_length:], last])
    return picked


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
    greedy = _greedy_token_ids()

    failures = [result for result in results if isinstance(result, TeacherCallError)]
    assert not failures, failures
    agree = known_positions = masked = slots = stops = positions = 0
    non_canonical: list[str] = []
    sources = set()
    for answer, picked in zip(results, greedy, strict=True):
        logprobs = answer.logprobs
        # The labels are the tokens the model picked, stop token included when it stopped.
        assert logprobs.token_ids.tolist() == picked, (answer.text, picked)
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
        encoded = tokenizer.encode(answer.text, add_special_tokens=False)
        if generated != encoded:
            first = next(i for i, (a, b) in enumerate(zip(generated, encoded, strict=False)) if a != b)
            spans = (tokenizer.convert_ids_to_tokens(ids[first : first + 3]) for ids in (generated, encoded))
            non_canonical.append("{} where the text encodes as {}".format(*spans))
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
        f"tokens are not the text's own encoding {len(non_canonical)} ({'; '.join(non_canonical)}); "
        f"top-1 mismatches {mismatches}"
    )
    assert sources == {TokenIdSource.RETOKENIZED}
    assert agreement >= 0.99
    assert any(any(ord(character) > 0x2E80 for character in answer.text) for answer in results)
    assert np.mean([answer.finish_reason == "stop" for answer in results]) > 0
