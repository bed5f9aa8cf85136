"""The context-free reference rows (uniform, unigram) and the non-embedding parameter count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stillhouse.trainer.data import TokenizedAnswer
from stillhouse.trainer.evaluation import model_token_totals
from stillhouse.trainer.losses import SparseTeacher
from stillhouse.trainer.model_size import non_embedding_parameters
from stillhouse.trainer.references import ContextFreeModel, uniform_model, unigram_counts, unigram_model


def _answer(response_ids: list[int]) -> TokenizedAnswer:
    return TokenizedAnswer("p", [1, 2], response_ids, "text", None)


def test_unigram_counts_response_tokens_only():
    counts = unigram_counts([_answer([3, 3, 0]), _answer([3, 1])], vocab_size=5)
    assert counts.tolist() == [1, 1, 0, 3, 0]  # prompt tokens [1, 2] are not counted
    with pytest.raises(ValueError, match="outside the vocabulary of 5 tokens"):
        unigram_counts([_answer([5])], vocab_size=5)


def test_unigram_is_add_half_smoothed_so_every_token_keeps_mass():
    model = unigram_model(np.array([1, 1, 0, 3, 0]))
    # (count + 0.5) / (5 + 0.5 * 5)
    expected = np.array([1.5, 1.5, 0.5, 3.5, 0.5]) / 7.5
    assert torch.exp(model.log_probs).numpy() == pytest.approx(expected, rel=1e-6)
    assert model.most_likely_token() == 3
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        unigram_model(np.array([1, 0]), smoothing=0)


def test_a_context_free_model_gives_the_same_logits_at_every_position():
    model = uniform_model(4)
    logits = model(input_ids=torch.zeros(2, 3, dtype=torch.long), position_ids=None, use_cache=False).logits
    assert logits.shape == (2, 3, 4)
    assert torch.allclose(logits, torch.full((2, 3, 4), -math.log(4)))
    with pytest.raises(ValueError, match="one vector over the vocabulary"):
        ContextFreeModel(torch.zeros(2, 4))


def test_reference_kl_is_taken_over_the_teachers_buckets():
    # Teacher: token 0 with p = 0.5, the rest in the tail. The uniform over 4 tokens has buckets
    # (0.25, 0.75): KL = 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75). Its perplexity is the vocabulary size.
    teacher = SparseTeacher(
        torch.tensor([[[0]]]), torch.tensor([[[math.log(0.5)]]]), torch.tensor([[math.log(0.5)]])
    )
    logits = uniform_model(4)(input_ids=torch.zeros(1, 1, dtype=torch.long)).logits
    figures = model_token_totals(logits, torch.tensor([[2]]), teacher).metrics()
    assert figures["kl"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-5)
    assert figures["perplexity"] == pytest.approx(4.0, rel=1e-5)


def _config(tied: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )


@pytest.mark.parametrize("tied", [False, True])
def test_non_embedding_parameters_leave_out_the_embedding_and_the_output_layer(tied: bool):
    # Per layer: q and o 64·64, k and v 64·32 (2 kv heads of 16), gate and up 64·128, down 128·64, two
    # norms of 64; then the final norm.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert non_embedding_parameters(_config(tied)) == 2 * per_layer + 64
    built = LlamaForCausalLM(_config(tied))
    vocabulary_parameters = 1000 * 64 * (1 if tied else 2)
    assert non_embedding_parameters(_config(tied)) == built.num_parameters() - vocabulary_parameters
