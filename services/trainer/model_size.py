"""How big a model is, from its config alone: non-embedding parameters.

The model is built on the meta device (shapes, no memory), and every parameter is counted except the
input token embedding and, when it is not tied to it, the output layer. What remains (attention, MLP,
norms) is the figure that compression claims are made in (Kaplan et al. 2020 count model size so): a
student with a pruned depth or width keeps the teacher's vocabulary, whose embeddings would otherwise
hide how much smaller it is.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig


def non_embedding_parameters(config: PretrainedConfig) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    excluded = {id(parameter) for parameter in model.get_input_embeddings().parameters()}
    output = model.get_output_embeddings()
    if output is not None:
        excluded |= {id(parameter) for parameter in output.parameters()}
    return sum(parameter.numel() for parameter in model.parameters() if id(parameter) not in excluded)
