"""Student initialisation on a tiny random 4-layer Llama teacher with SmolLM2's tokenizer (built here),
and once on the real embedded SmolLM2 teacher (slow): each student must save and load back as a plain
Hugging Face model."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

# Nothing may be fetched from a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from stillhouse.common.datasets.artifacts import download_artifact, upload_folder
from stillhouse.common.jobspec import StudentInit, TeacherSpec
from stillhouse.common.models.model_loading import EMBEDDED_TEACHER, load_model, resolve_model_reference
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.trainer.layer_influence import evenly_spread_layers
from stillhouse.trainer.student_init import (
    build_student,
    check_tokenizers,
    prune_depth,
    prune_width,
    pruned_width,
    teacher_tokenizer,
)

TEACHER_LAYERS = 4
INPUT_IDS = torch.tensor([[1, 520, 33, 7000, 12, 9, 401, 2]])


def local(model: str | Path) -> TeacherSpec:
    return TeacherSpec.model_validate({"backend": "local", "model": str(model)})


def init(**fields: object) -> StudentInit:
    return StudentInit.model_validate(fields)


def no_fetch(reference: str, field: str) -> str:
    """`locate` for local models only: the reference as given."""
    assert not reference.startswith("s3://"), f"nothing should be fetched, asked for {reference} ({field})"
    return reference


@pytest.fixture(scope="module")
def smollm2_tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def teacher_dir(tiny_llama: Callable[..., Path], tmp_path: Path) -> Path:
    return tiny_llama(tmp_path / "teacher", layers=TEACHER_LAYERS)


@pytest.fixture
def teacher_model(teacher_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)


def round_trip(model: torch.nn.Module, tokenizer, folder: Path) -> torch.nn.Module:
    """Save with save_pretrained, load back with from_pretrained, and check that the copy is plain (no
    quantization config) and computes the same logits."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT_IDS).logits, model(INPUT_IDS).logits)
    return loaded


def greedy_with_and_without_cache(model: torch.nn.Module) -> None:
    """A KV cache (which a layer finds by its index) must not change greedy decoding."""
    model.eval()
    with torch.no_grad():
        cached = model.generate(INPUT_IDS, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(INPUT_IDS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# --- depth ---------------------------------------------------------------------------------------------


def test_depth_keeps_the_first_the_last_and_evenly_spread_layers():
    assert evenly_spread_layers(30, 4) == [0, 10, 19, 29]
    assert evenly_spread_layers(4, 2) == [0, 3]
    assert evenly_spread_layers(4, 1) == [0]
    for layers in range(2, 40):
        for keep in range(2, layers):
            kept = evenly_spread_layers(layers, keep)
            assert kept[0] == 0 and kept[-1] == layers - 1
            assert kept == sorted(set(kept)) and len(kept) == keep
    for bad in (0, 4, 5):
        with pytest.raises(ValueError, match=r"between 1 and 3 \(the teacher has 4 decoder layers\)"):
            evenly_spread_layers(4, bad)


def test_depth_pruned_student_holds_the_teachers_chosen_layers(
    teacher_dir: Path, teacher_model: torch.nn.Module, smollm2_tokenizer, tmp_path: Path
):
    student, tokenizer = build_student(
        init(pruneTeacherDepth=2, layerSelection="spread"), local(teacher_dir), no_fetch
    )
    assert student.training and student.dtype == torch.float32
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    teacher_weights = teacher_model.state_dict()
    student_weights = student.state_dict()
    for name, value in student_weights.items():
        # Student layer 1 is teacher layer 3; everything outside the layers is the teacher's.
        teacher_name = name.replace("layers.1.", "layers.3.")
        torch.testing.assert_close(value, teacher_weights[teacher_name], rtol=0, atol=0, msg=name)
    assert not any(name.startswith(("model.layers.2.", "model.layers.3.")) for name in student_weights)
    assert check_tokenizers(tokenizer, smollm2_tokenizer) is None

    loaded = round_trip(student, tokenizer, tmp_path / "student")
    assert loaded.config.num_hidden_layers == 2
    assert check_tokenizers(AutoTokenizer.from_pretrained(tmp_path / "student"), smollm2_tokenizer) is None
    greedy_with_and_without_cache(loaded)


def test_depth_pruning_refuses_as_many_layers_as_the_teacher_has(teacher_dir: Path):
    for selection in ("spread", "influence"):
        with pytest.raises(ValueError, match="pruneTeacherDepth must be between 1 and 3"):
            build_student(
                init(pruneTeacherDepth=TEACHER_LAYERS, layerSelection=selection), local(teacher_dir), no_fetch
            )


def test_influence_selection_keeps_the_layers_the_chooser_picks(teacher_dir: Path, teacher_model):
    asked = []

    def choose(model, tokenizer, keep):
        asked.append((len(model.model.layers), keep))
        return [0, 2]

    student, _ = build_student(init(pruneTeacherDepth=2), local(teacher_dir), no_fetch, choose_layers=choose)
    assert asked == [(TEACHER_LAYERS, 2)]
    torch.testing.assert_close(
        student.model.layers[1].mlp.up_proj.weight, teacher_model.model.layers[2].mlp.up_proj.weight
    )
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    with pytest.raises(ValueError, match="needs calibration text"):
        build_student(init(pruneTeacherDepth=2), local(teacher_dir), no_fetch)


def test_depth_and_width_together_rank_layers_on_the_whole_teacher_then_narrow_them(
    teacher_dir: Path, teacher_model: torch.nn.Module
):
    widths_seen, layers_ranked = [], []
    full = teacher_model.config.intermediate_size
    importance = [torch.rand(full, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]

    def choose(model, tokenizer, keep):
        widths_seen.append(model.config.intermediate_size)
        return [0, 3]

    def rank_channels(model, tokenizer):
        layers_ranked.append(len(model.model.layers))
        return importance

    both = init(pruneTeacherDepth=2, pruneTeacherWidth=0.5)
    student, _ = build_student(
        both, local(teacher_dir), no_fetch, choose_layers=choose, rank_channels=rank_channels
    )
    assert widths_seen == [full] and layers_ranked == [2]
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == full // 2
    for student_layer, teacher_index, ranking in zip(student.model.layers, [0, 3], importance, strict=True):
        source = teacher_model.model.layers[teacher_index].mlp
        kept = ranking.topk(full // 2).indices.sort().values
        kept_rows = source.up_proj.weight[kept]
        torch.testing.assert_close(student_layer.mlp.up_proj.weight, kept_rows, rtol=0, atol=0)
    greedy_with_and_without_cache(student)
    with pytest.raises(ValueError, match="pruneTeacherWidth needs calibration text"):
        build_student(both, local(teacher_dir), no_fetch, choose_layers=choose)
    with pytest.raises(ValueError, match="channel importance for 1 layers; the model has 2"):
        build_student(
            both,
            local(teacher_dir),
            no_fetch,
            choose_layers=choose,
            rank_channels=lambda m, t: importance[:1],
        )


def test_layer_selection_without_depth_pruning_is_refused():
    with pytest.raises(ValueError, match="`layerSelection` chooses the layers of `pruneTeacherDepth`"):
        init(pruneTeacherWidth=0.5, layerSelection="spread")


# --- width ---------------------------------------------------------------------------------------------


def test_width_rounds_to_a_multiple_of_eight_and_refuses_keeping_everything():
    assert pruned_width(1536, 0.5) == 768
    assert pruned_width(128, 0.3) == 40  # 38.4 -> 40
    assert pruned_width(128, 0.01) == 8
    with pytest.raises(ValueError, match="keeps every channel"):
        pruned_width(128, 0.99)


def test_width_pruning_keeps_the_channels_ranked_most_important(
    tiny_llama: Callable[..., Path], tmp_path: Path
):
    # The ranking puts channels IMPORTANT first in every layer, but channel 1 last.
    folder = tiny_llama(tmp_path / "teacher", layers=TEACHER_LAYERS)
    teacher = AutoModelForCausalLM.from_pretrained(folder)
    important = torch.arange(1, 128, 2)  # 64 of the 128 channels
    ranked = []

    def rank_channels(model, tokenizer):
        ranked.append(model.config.intermediate_size)
        importance = torch.ones(128)
        importance[important] = 3.0
        importance[1] = 0.0
        return [importance.clone() for _ in model.model.layers]

    student, tokenizer = build_student(
        init(pruneTeacherWidth=0.5), local(folder), no_fetch, rank_channels=rank_channels
    )
    assert ranked == [128] and student.config.intermediate_size == 64
    # Channel 1 is dropped; one of the others (all equal) takes its place.
    expected_kept = important[important != 1]
    for student_layer, teacher_layer in zip(student.model.layers, teacher.model.layers, strict=True):
        mlp, source = student_layer.mlp, teacher_layer.mlp
        assert mlp.gate_proj.weight.shape == (64, 64) and mlp.up_proj.weight.shape == (64, 64)
        assert mlp.down_proj.weight.shape == (64, 64)
        kept = [
            int(torch.nonzero((source.up_proj.weight == row).all(dim=1))[0]) for row in mlp.up_proj.weight
        ]
        assert kept == sorted(kept)  # channels keep their order
        assert set(expected_kept.tolist()) <= set(kept) and 1 not in kept
        torch.testing.assert_close(mlp.gate_proj.weight, source.gate_proj.weight[kept], rtol=0, atol=0)
        torch.testing.assert_close(mlp.down_proj.weight, source.down_proj.weight[:, kept], rtol=0, atol=0)
    # Attention, norms and embeddings are untouched.
    torch.testing.assert_close(
        student.model.layers[2].self_attn.q_proj.weight, teacher.model.layers[2].self_attn.q_proj.weight
    )
    loaded = round_trip(student, tokenizer, tmp_path / "student")
    assert loaded.config.intermediate_size == 64
    greedy_with_and_without_cache(loaded)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_both_prunings_work_on_every_llama_family_architecture(model_type: str):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=9000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    prune_depth(model, [0, 2, 4])
    assert prune_width(model, 0.5, [torch.rand(64) for _ in model.model.layers]) == 32
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 32
    greedy_with_and_without_cache(model)


# --- fresh config --------------------------------------------------------------------------------------


def test_fresh_student_takes_the_teachers_config_with_overrides(
    teacher_dir: Path, teacher_model: torch.nn.Module, tmp_path: Path
):
    torch.manual_seed(1)
    overrides = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 48, "rms_norm_eps": 1e-6}
    student, tokenizer = build_student(init(config=overrides), local(teacher_dir), no_fetch)
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (1, 32, 48)
    assert config.rms_norm_eps == 1e-6
    assert config.head_dim == 32 // 4  # derived again from the new width, not kept from the teacher
    assert config.vocab_size == teacher_model.config.vocab_size and config.model_type == "llama"
    assert student.model.embed_tokens.weight.shape == (len(tokenizer), 32)
    assert student.training
    round_trip(student, tokenizer, tmp_path / "student")


def test_fresh_student_config_errors_name_the_key(teacher_dir: Path):
    teacher = local(teacher_dir)
    with pytest.raises(ValueError, match=r"unknown llama config keys \['num_layers'\]"):
        build_student(init(config={"num_layers": 2}), teacher, no_fetch)
    with pytest.raises(
        ValueError, match=r"'hidden_size' must be a whole number \(the teacher's is 64\); got 'big'"
    ):
        build_student(init(config={"hidden_size": "big"}), teacher, no_fetch)
    with pytest.raises(ValueError, match=r"\['model_type'\] cannot be changed"):
        build_student(init(config={"model_type": "gpt2"}), teacher, no_fetch)
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the tokenizer's 49152 tokens"):
        build_student(init(config={"vocab_size": 100}), teacher, no_fetch)


# --- pretrained ----------------------------------------------------------------------------------------


def test_pretrained_student_from_a_folder_and_from_object_storage(
    teacher_dir: Path, teacher_model: torch.nn.Module, object_store: ObjectStore, tmp_path: Path
):
    openai = TeacherSpec.model_validate({"backend": "openai", "baseURL": "http://x/v1", "model": "m"})
    student, tokenizer = build_student(init(pretrained=str(teacher_dir)), openai, no_fetch)
    assert student.training
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, teacher_model.state_dict()[name], rtol=0, atol=0)
    round_trip(student, tokenizer, tmp_path / "copy")

    upload_folder(object_store, "models/tiny", teacher_dir)
    fetched: list[str] = []

    def fetch(reference: str, field: str) -> str:
        if not reference.startswith("s3://"):
            return reference
        fetched.append(reference)
        destination = tmp_path / "fetched"
        download_artifact(object_store, reference.removeprefix("s3://stillhouse-test/"), destination)
        return str(destination)

    from_store, _ = build_student(init(pretrained="s3://stillhouse-test/models/tiny"), openai, fetch)
    assert fetched == ["s3://stillhouse-test/models/tiny"]
    torch.testing.assert_close(from_store.lm_head.weight, teacher_model.lm_head.weight, rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match=r"student\.init\.pretrained: model '/no/such/model'"):
        build_student(init(pretrained="/no/such/model"), openai, no_fetch)


# --- refusals ------------------------------------------------------------------------------------------


def test_pruning_needs_a_local_llama_family_teacher(smollm2_tokenizer, tmp_path: Path):
    openai = TeacherSpec.model_validate({"backend": "openai", "baseURL": "http://x/v1", "model": "m"})
    with pytest.raises(ValueError, match="a teacher with backend `openai` does not have: use `pretrained`"):
        build_student(init(pruneTeacherDepth=2), openai, no_fetch)

    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(smollm2_tokenizer), n_positions=64, n_embd=32, n_layer=3, n_head=2)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")
    smollm2_tokenizer.save_pretrained(tmp_path / "gpt2")
    for option in ({"pruneTeacherDepth": 2}, {"pruneTeacherWidth": 0.5}):
        with pytest.raises(ValueError, match=r"works on Llama-family models .*the teacher is a 'gpt2' model"):
            build_student(init(**option), local(tmp_path / "gpt2"), no_fetch)
    # A fresh model from its config needs no Llama layout.
    student, _ = build_student(init(config={"n_layer": 1}), local(tmp_path / "gpt2"), no_fetch)
    assert student.config.n_layer == 1


# --- tokenizers ----------------------------------------------------------------------------------------


def test_check_tokenizers_compares_vocabularies_not_objects(teacher_dir: Path, smollm2_tokenizer):
    # The local teacher's tokenizer, loaded from its own folder: another object, the same vocabulary.
    teacher = teacher_tokenizer(local(teacher_dir), no_fetch)
    assert teacher is not smollm2_tokenizer
    assert check_tokenizers(smollm2_tokenizer, teacher) is None

    extended = copy.deepcopy(teacher)
    extended.add_tokens(["<tool_call>"])
    reason = check_tokenizers(extended, teacher)
    assert reason is not None
    assert "49153 tokens) differs from the teacher's (49152 tokens)" in reason
    assert "1 tokens only in the student's (e.g. ['<tool_call>'])" in reason

    other_eos = copy.deepcopy(teacher)
    other_eos.eos_token = "<|endoftext|>"
    assert teacher.eos_token != "<|endoftext|>"
    assert "end-of-sequence tokens differ" in (check_tokenizers(other_eos, teacher) or "")


def test_check_tokenizers_notices_the_same_vocabulary_split_differently():
    vocabulary = {"<unk>": 0, "</s>": 1, "Hello": 2, "Hello,": 3}

    def word_level(pre_tokenizer) -> PreTrainedTokenizerFast:
        tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizer
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")

    # "Hello, world!" is "Hello," to one and "Hello" "," to the other.
    by_spaces, by_words = (
        word_level(pre_tokenizers.WhitespaceSplit()),
        word_level(pre_tokenizers.Whitespace()),
    )
    assert check_tokenizers(by_spaces, word_level(pre_tokenizers.WhitespaceSplit())) is None
    assert check_tokenizers(by_spaces, by_words) == (
        "the vocabularies are the same but the tokenizers split text differently"
    )


def test_teacher_tokenizer_of_an_openai_teacher_is_the_one_its_spec_names(
    tokenizer_dir: Path, smollm2_tokenizer
):
    openai = {"backend": "openai", "baseURL": "http://x/v1", "model": "m"}
    assert teacher_tokenizer(TeacherSpec.model_validate(openai), no_fetch) is None
    named = teacher_tokenizer(
        TeacherSpec.model_validate({**openai, "tokenizer": str(tokenizer_dir)}), no_fetch
    )
    assert named is not None and check_tokenizers(named, smollm2_tokenizer) is None


# --- the real embedded teacher -------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_teacher_pruned_to_four_layers_saves_and_reloads(tmp_path: Path):
    teacher = load_model(
        resolve_model_reference(EMBEDDED_TEACHER), device=torch.device("cpu"), dtype=torch.float32
    )
    student, tokenizer = build_student(
        init(pruneTeacherDepth=4, layerSelection="spread"), local(EMBEDDED_TEACHER), no_fetch
    )
    assert student.config.num_hidden_layers == 4
    assert student.hf_quantizer is None
    kept = evenly_spread_layers(teacher.config.num_hidden_layers, 4)
    assert kept == [0, 10, 19, 29]
    for index, teacher_index in enumerate(kept):
        torch.testing.assert_close(
            student.model.layers[index].mlp.down_proj.weight,
            teacher.model.layers[teacher_index].mlp.down_proj.weight,
            rtol=0,
            atol=0,
        )
    loaded = round_trip(student, tokenizer, tmp_path / "student")
    assert loaded.config.num_hidden_layers == 4 and loaded.config.vocab_size == 49152
    assert tokenizer.chat_template

    # A fresh model from the GGUF teacher's config saves as a plain model too.
    fresh, tokenizer = build_student(init(config={"num_hidden_layers": 2}), local(EMBEDDED_TEACHER), no_fetch)
    assert fresh.config.hidden_size == 576 and fresh.config.num_hidden_layers == 2
    round_trip(fresh, tokenizer, tmp_path / "fresh")
