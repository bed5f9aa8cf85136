"""Exact token ids from each server dialect's chat completions, on SmolLM2's real tokenizer.

Every response here is built the way the server named in its test builds it, from token ids that the
tokenizer itself produced for a text with accents, CJK and emoji (several of its tokens end inside a
UTF-8 character): OpenAI (true `bytes`), vLLM (`token_id:N`, or text with bytes re-encoded from lossy
text), llama-cpp-python's server (text with partial characters dropped, `bytes: null`, alternatives
keyed by text so that some collapse).
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from transformers import AutoTokenizer

from stillhouse.common.datasets.sparse_logprobs import LOGPROB_FLOOR
from stillhouse.teacher.backends import openai_wire
from stillhouse.teacher.backends.openai_capture import capture_logprobs
from stillhouse.teacher.calls import ChatMessage, FailureKind, TeacherCall, TeacherCallError, TokenIdSource
from stillhouse.teacher.token_vocabulary import TokenVocabulary, gpt2_unicode_to_byte

TEXT = "Café au lait, s'il vous plaît! 日本語のテキスト 🎉🚀 naïve résumé."
K = 5
SAMPLED_LOGPROB = -0.3
ALTERNATIVE_LOGPROBS = [-2.5, -3.0, -4.0, -5.0]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def vocabulary(tokenizer) -> TokenVocabulary:
    return TokenVocabulary.from_tokenizer(tokenizer)


def call(top_logprobs: int = K, temperature: float = 0.0) -> TeacherCall:
    return TeacherCall(
        backend="openai",
        base_url="http://teacher/v1",
        model="smollm2",
        revision="",
        messages=(ChatMessage("user", "Say something in three languages."),),
        temperature=temperature,
        top_p=1.0,
        max_tokens=64,
        seed=None,
        top_logprobs=top_logprobs,
    )


# --- recorded-shape responses ----------------------------------------------------------------------


def _token_bytes(tokenizer, token_id: int) -> bytes:
    alphabet = gpt2_unicode_to_byte()
    return bytes(alphabet[character] for character in tokenizer.convert_ids_to_tokens(token_id))


def true_alternatives(tokenizer, ids: list[int]) -> list[list[tuple[int, float]]]:
    """The teacher's top-k at each position: the generated token, then a token that ends inside a
    character, " the", and two more, each less likely."""
    partial = tokenizer.convert_tokens_to_ids("æĹ")  # b"\xe6\x97": the start of a CJK character
    common = tokenizer.encode(" the", add_special_tokens=False)[0]
    rng = np.random.default_rng(0)
    rows = []
    for token_id in ids:
        others = [partial, common, *rng.choice(np.arange(100, 40_000), 2, replace=False).tolist()]
        others = [*[other for other in others if other != token_id][:3], int(rng.integers(40_000, 49_000))]
        rows.append([(token_id, SAMPLED_LOGPROB), *zip(others, ALTERNATIVE_LOGPROBS, strict=True)])
    return rows


def openai_body(content: list[dict], text: str, finish_reason: str = "stop") -> bytes:
    return msgspec.json.encode(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": {"content": content},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": len(content)},
        }
    )


def openai_response(tokenizer, ids: list[int], text: str) -> bytes:
    """OpenAI: token text decoded leniently, the token's true bytes; the stop token not listed."""

    def entry(token_id: int, logprob: float) -> dict:
        piece = _token_bytes(tokenizer, token_id)
        return {"token": piece.decode(errors="replace"), "logprob": logprob, "bytes": list(piece)}

    content = [
        {**entry(token_id, SAMPLED_LOGPROB), "top_logprobs": [entry(*pair) for pair in row]}
        for token_id, row in zip(ids, true_alternatives(tokenizer, ids), strict=True)
    ]
    return openai_body(content, text)


def vllm_response(tokenizer, ids: list[int], text: str, *, token_ids: bool) -> bytes:
    """vLLM: with `return_tokens_as_token_ids`, "token_id:N"; without, the text with U+FFFD for a
    partial character and bytes re-encoded from that text. The stop token is listed last."""
    stop = tokenizer.eos_token_id
    ids_with_stop = [*ids, stop]

    def entry(token_id: int, logprob: float) -> dict:
        piece = _token_bytes(tokenizer, token_id) if token_id != stop else tokenizer.eos_token.encode()
        token = piece.decode(errors="replace")
        return {
            "token": f"token_id:{token_id}" if token_ids else token,
            "logprob": logprob,
            "bytes": list(token.encode()),
        }

    content = [
        {**entry(token_id, SAMPLED_LOGPROB), "top_logprobs": [entry(*pair) for pair in row]}
        for token_id, row in zip(ids_with_stop, true_alternatives(tokenizer, ids_with_stop), strict=True)
    ]
    return openai_body(content, text)


def llama_cpp_response(tokenizer, ids: list[int], text: str) -> bytes:
    """llama-cpp-python's server: each token's text with partial characters dropped, `bytes: null`,
    and the top k as a dict keyed by that text, the generated token written last."""

    def text_of(token_id: int) -> str:
        return _token_bytes(tokenizer, token_id).decode(errors="ignore")

    content = []
    for token_id, row in zip(ids, true_alternatives(tokenizer, ids), strict=True):
        top = {text_of(other): logprob for other, logprob in row}
        top[text_of(token_id)] = SAMPLED_LOGPROB
        content.append(
            {
                "token": text_of(token_id),
                "bytes": None,
                "logprob": SAMPLED_LOGPROB,
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()],
            }
        )
    return openai_body(content, text)


# --- what every dialect must give --------------------------------------------------------------


def assert_exact(answer, tokenizer, ids: list[int], *, stop_added: bool, stop_listed: bool = False) -> None:
    logprobs = answer.logprobs
    expected = ids + ([tokenizer.eos_token_id] if stop_added or stop_listed else [])
    assert logprobs.token_ids.tolist() == expected
    assert answer.stop_token_added is stop_added
    truth = true_alternatives(tokenizer, expected)
    for step, row in enumerate(truth[: len(ids)]):
        known = logprobs.topk_ids[step] != -1
        # Known slots come first, most likely first, and each is the true id with its true logprob.
        assert known.tolist() == sorted(known.tolist(), reverse=True)
        true_logprob = dict(row)
        for token_id, logprob in zip(
            logprobs.topk_ids[step][known], logprobs.topk_logprobs[step][known], strict=True
        ):
            assert logprob == pytest.approx(true_logprob[int(token_id)], abs=1e-6)
        assert (logprobs.topk_logprobs[step][~known] == LOGPROB_FLOOR).all()
        # The generated token is always known here, and top-1.
        assert logprobs.topk_ids[step, 0] == ids[step]
        mass = sum(math.exp(true_logprob[int(token_id)]) for token_id in logprobs.topk_ids[step][known])
        assert logprobs.tail_logprob[step] == pytest.approx(math.log1p(-mass), abs=1e-5)
    assert answer.top1_mismatches == 0
    sent = len(expected) - int(stop_added)
    assert answer.masked_alternatives == int((logprobs.topk_ids[:sent] == -1).sum())
    if stop_added:
        assert (logprobs.topk_ids[-1] == -1).all() and logprobs.tail_logprob[-1] == 0


def test_the_text_has_tokens_that_end_inside_a_character(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    partial = [
        token_id
        for token_id in ids
        if b"\xef\xbf\xbd" in _token_bytes(tokenizer, token_id).decode(errors="replace").encode()
    ]
    assert len(partial) >= 6


def test_openai_bytes_give_every_id(tokenizer, vocabulary):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    answer = openai_wire.parse_chat_completion(
        openai_response(tokenizer, ids, TEXT), call(), vocabulary, ids_from_server=False, latency_seconds=0
    )
    assert answer.token_id_source is TokenIdSource.BYTES
    assert_exact(answer, tokenizer, ids, stop_added=True)
    assert answer.masked_alternatives == 0


def test_vllm_token_ids_give_every_id_and_list_the_stop_token(tokenizer, vocabulary):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    body = vllm_response(tokenizer, ids, TEXT, token_ids=True)
    answer = openai_wire.parse_chat_completion(
        body, call(), vocabulary, ids_from_server=True, latency_seconds=0
    )
    assert answer.token_id_source is TokenIdSource.SERVER
    assert_exact(answer, tokenizer, ids, stop_added=False, stop_listed=True)
    assert answer.masked_alternatives == 0


def test_vllm_lossy_bytes_are_not_trusted_and_the_answer_is_retokenized(tokenizer, vocabulary):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    body = vllm_response(tokenizer, ids, TEXT, token_ids=False)
    answer = openai_wire.parse_chat_completion(
        body, call(), vocabulary, ids_from_server=False, latency_seconds=0
    )
    assert answer.token_id_source is TokenIdSource.RETOKENIZED
    assert_exact(answer, tokenizer, ids, stop_added=False, stop_listed=True)
    # The partial-character alternative is written as U+FFFD, which many tokens can be: masked.
    assert answer.masked_alternatives >= len(ids) - 1


def test_llama_cpp_partial_characters_are_recovered_by_retokenizing(tokenizer, vocabulary):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    body = llama_cpp_response(tokenizer, ids, TEXT)
    document = msgspec.json.decode(body)
    content = document["choices"][0]["logprobs"]["content"]
    assert any(position["token"] == "" for position in content)
    assert any(len(position["top_logprobs"]) < K for position in content)
    answer = openai_wire.parse_chat_completion(
        body, call(), vocabulary, ids_from_server=False, latency_seconds=0
    )
    assert answer.token_id_source is TokenIdSource.RETOKENIZED
    assert_exact(answer, tokenizer, ids, stop_added=True)
    assert answer.masked_alternatives >= len(ids)  # the partial alternative collapsed or unknown


def test_an_answer_text_that_is_not_the_tokens_fails_the_prompt(tokenizer, vocabulary):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    body = llama_cpp_response(tokenizer, ids, TEXT.replace("日本語", "中文"))
    with pytest.raises(TeacherCallError) as error:
        openai_wire.parse_chat_completion(body, call(), vocabulary, ids_from_server=False, latency_seconds=0)
    assert error.value.kind is FailureKind.UNMAPPABLE_TOKEN and "tokenizer" in error.value.message


def test_a_generated_token_not_in_the_vocabulary_fails_the_prompt(tokenizer, vocabulary):
    """True bytes that no token has: another model's tokenizer. Re-tokenising cannot place it either."""
    ids = tokenizer.encode("Hello", add_special_tokens=False)
    content = [
        {
            "token": "Hello",
            "logprob": -0.1,
            "bytes": [72, 101, 108, 108, 111, 0],
            "top_logprobs": [{"token": "Hello", "logprob": -0.1, "bytes": [72, 101, 108, 108, 111, 0]}],
        }
    ]
    with pytest.raises(TeacherCallError) as error:
        openai_wire.parse_chat_completion(
            openai_body(content, "Hello\0"), call(), vocabulary, ids_from_server=False, latency_seconds=0
        )
    assert error.value.kind is FailureKind.UNMAPPABLE_TOKEN and "'Hello'" in error.value.message
    assert ids  # the text itself is fine: it is the bytes that name no token


# --- merging, mismatches, the vocabulary -----------------------------------------------------------


def _positions(rows: list[tuple[str, float, list[tuple[str, float]]]]) -> list[openai_wire.TokenLogprob]:
    top = openai_wire.TopLogprob
    return [
        openai_wire.TokenLogprob(token, logprob, top_logprobs=[top(t, lp) for t, lp in alternatives])
        for token, logprob, alternatives in rows
    ]


def test_repeated_alternatives_count_once_and_two_spellings_of_one_id_are_summed():
    content = _positions(
        [
            ("token_id:7", -0.5, [("token_id:7", -0.5), ("token_id:7", -0.5), ("token_id:9", -1.5)]),
            ("token_id:3", -1.0, [("token_id:3", -1.0), ("token_id:3", -2.0), ("token_id:4", -3.0)]),
        ]
    )
    capture = capture_logprobs(
        content, 3, text="", finish_reason="length", temperature=1.0, vocabulary=None, ids_from_server=True
    )
    logprobs = capture.logprobs
    assert logprobs.topk_ids.tolist() == [[7, 9, -1], [3, 4, -1]]
    assert logprobs.topk_logprobs[0, 0] == pytest.approx(-0.5)
    assert logprobs.topk_logprobs[1, 0] == pytest.approx(math.log(math.exp(-1.0) + math.exp(-2.0)), abs=1e-6)
    # Probabilities of a position never sum past 1.
    total = np.exp(logprobs.topk_logprobs.astype(np.float64)).sum(axis=1) + np.exp(logprobs.tail_logprob)
    assert (total <= 1 + 1e-5).all()
    assert capture.masked_alternatives == 2


def test_top1_mismatches_are_counted_at_temperature_zero_only():
    content = _positions(
        [
            ("token_id:7", -2.0, [("token_id:8", -0.2), ("token_id:7", -2.0)]),
            ("token_id:3", -0.1, [("token_id:3", -0.1), ("token_id:4", -3.0)]),
        ]
    )
    options = {"text": "", "finish_reason": "length", "vocabulary": None, "ids_from_server": True}
    assert capture_logprobs(content, 2, temperature=0.0, **options).top1_mismatches == 1
    assert capture_logprobs(content, 2, temperature=0.7, **options).top1_mismatches == 0


def test_byte_level_vocabulary_keys_become_their_bytes(tokenizer, vocabulary):
    (love,) = tokenizer.encode(" love", add_special_tokens=False)
    assert vocabulary.id_of_bytes(b" love") == love
    assert vocabulary.id_of_text(" love") == love
    assert vocabulary.id_of_bytes(b"\xe6\x97") == tokenizer.convert_tokens_to_ids("æĹ")
    assert vocabulary.id_of_text("") is None  # every token ending inside a character reads as ""
    assert vocabulary.id_of_bytes(b"<|im_end|>") == tokenizer.eos_token_id
    assert vocabulary.eos_id == tokenizer.eos_token_id


def test_sentencepiece_vocabulary_keys_become_their_bytes():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<unk>": 0,
        "</s>": 1,
        "▁hello": 2,
        "<0xE6>": 3,
        "<0x97>": 4,
        "▁": 5,
        "é": 6,
        "<0x41>": 7,
        "A": 8,
    }
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    vocabulary = TokenVocabulary.from_tokenizer(tokenizer)
    assert vocabulary.id_of_bytes(b" hello") == 2
    assert vocabulary.id_of_bytes(b"\xe6") == 3
    assert vocabulary.id_of_bytes("é".encode()) == 6
    assert vocabulary.id_of_bytes(b" ") == 5
    assert vocabulary.id_of_bytes(b"A") is None  # "<0x41>" and "A": two tokens, never a guess
    assert vocabulary.eos_id == 1
