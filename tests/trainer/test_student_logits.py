"""Logits at labelled positions through the model's own forward, on tiny random models whose forward
does more than apply the output layer: Gemma-2's final soft-capping, Cohere's and Granite's logit
scaling (and plain Llama)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    PretrainedConfig,
    WhisperConfig,
)

from stillhouse.trainer.run_config import UnsupportedArchitecture
from stillhouse.trainer.student_logits import decoder_layers, labelled_logits, unsupported_architecture
from stillhouse.trainer.train_loop import require_supported_architecture

SMALL = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
CONFIGS = {
    "gemma2": lambda: Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0, sliding_window=8),
    "cohere": lambda: CohereConfig(**SMALL, logit_scale=0.25),
    "granite": lambda: GraniteConfig(**SMALL, logits_scaling=4.0),
    "llama": lambda: LlamaConfig(**SMALL),
}


def packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 12 positions: the first packs examples of 5 and 7 positions, the second one of 9 and
    padding. Labelled positions differ between the rows."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=generator)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], list(range(12))])
    labelled = torch.zeros(2, 12, dtype=torch.bool)
    labelled[0, [2, 3, 4, 8, 9, 10, 11]] = True
    labelled[1, [5, 6, 7, 8]] = True
    return input_ids, position_ids, labelled


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_logits_are_the_models_own_at_the_labelled_positions(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager").eval()
    input_ids, position_ids, labelled = packed_batch()
    with torch.no_grad():
        logits = labelled_logits(model, input_ids, position_ids, labelled)
        full = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        hidden = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        head_only = model.get_output_embeddings()(hidden.last_hidden_state[labelled])

    assert logits.shape == (1, int(labelled.sum()), SMALL["vocab_size"])
    torch.testing.assert_close(logits[0], full[labelled], rtol=1e-5, atol=1e-5)
    if name != "llama":  # the output layer alone misses what the model does to its logits
        assert not torch.allclose(logits[0], head_only, atol=1e-3)


def test_gradients_reach_the_model_through_its_forward():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["gemma2"](), attn_implementation="eager")
    input_ids, position_ids, labelled = packed_batch()
    labelled_logits(model, input_ids, position_ids, labelled).logsumexp(-1).sum().backward()
    assert all(parameter.grad is not None for parameter in decoder_layers(model).parameters())
    assert len(decoder_layers(model)) == SMALL["num_hidden_layers"]


@pytest.mark.parametrize(
    "config", [Gemma2Config(), CohereConfig(), GraniteConfig(), LlamaConfig(), BertConfig()]
)
def test_causal_lms_with_logits_to_keep_are_supported(config):
    assert unsupported_architecture(config.model_type) is None


def test_other_architectures_are_refused_by_name():
    reason = unsupported_architecture(WhisperConfig().model_type)
    assert reason is not None and "WhisperForCausalLM" in reason and "logits_to_keep" in reason
    reason = unsupported_architecture(UnknownConfig.model_type)
    assert reason is not None and "'no-such-model'" in reason


class UnknownConfig(PretrainedConfig):
    model_type = "no-such-model"


def test_training_refuses_a_student_it_cannot_run_through_its_forward():
    whisper = WhisperConfig(
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
    )
    model = AutoModelForCausalLM.from_config(whisper)
    with pytest.raises(UnsupportedArchitecture, match=r"^student: WhisperForCausalLM"):
        require_supported_architecture(model, "student")
    require_supported_architecture(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), "student")
