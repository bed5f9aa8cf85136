"""Logits at the labelled positions of a packed batch, through the causal LM's own forward.

The output layer and everything of vocabulary size after it (the loss) cost nothing on prompt tokens and
padding when only the labelled positions are projected. transformers (5.x) causal LMs take
``logits_to_keep``: given the boolean mask of labelled positions [B, T], they project only those and return
logits [N, V] in row-major order. Going through the model's own forward (rather than applying the output
layer to the last hidden state) keeps whatever the model does to its logits: Gemma-2/3's final
soft-capping, Cohere's and Granite's logit scaling. Nothing wraps the model, so its state dict keeps its
own keys for checkpoints, DDP and FSDP.

`unsupported_architecture` says, from a config's model type alone, why a model cannot be trained this
way (None when it can), so that a job is refused at submit before anything runs.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def unsupported_architecture(model_type: str) -> str | None:
    """Why the causal LM of `model_type` (a config's `model_type`) cannot give logits at labelled
    positions through its own forward, or None when it can."""
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if not isinstance(class_name, str):
        return (
            f"model type {model_type!r} has no causal language model class in transformers "
            f"{transformers.__version__} (AutoModelForCausalLM): only causal LMs can be distilled into"
        )
    model_class = getattr(transformers, class_name)
    if "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
        return (
            f"{class_name} (model type {model_type!r}) cannot compute its logits at chosen positions only "
            "(its forward takes no `logits_to_keep`), which training needs: use another architecture"
        )
    return None


def labelled_logits(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, labelled: torch.Tensor
) -> torch.Tensor:
    """The logits of `model` (a causal LM, or one wrapped by DDP or FSDP) at the `labelled` positions
    (bool [B, T]) of a packed batch: [1, N, V] for the N labelled positions, in row-major order."""
    output = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=labelled)
    return output.logits.reshape(1, -1, output.logits.shape[-1])


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a causal LM (each is sharded on its own under FSDP)."""
    return getattr(model, model.base_model_prefix).layers
