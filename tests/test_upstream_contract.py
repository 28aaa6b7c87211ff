"""The private methods and attributes of transformers and vLLM that we override or read still exist as we use them.

One place that names what moved when a dependency is upgraded, instead of a failure deep in a generation test. Runs
in the main venv (transformers 5.23; the vLLM part skips) and in the serve venv (transformers 5.19 and vLLM):
``python -m pytest -q tests/test_upstream_contract.py`` in each. An override is found through our own class: the
first class after ours in its MRO (skipping our modules) must still define the method, and its leading parameters
must be the ones we pass (by position or name).
"""

from __future__ import annotations

import importlib
import inspect

import pytest

OURS = ("visionzip.", "llava.")  # modules whose classes are ours; an upstream owner is any other


def _load(path: str) -> type:
    """``"module:Class"`` -> the class."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _upstream_owner(cls: type, name: str) -> type | None:
    """The first class in ``cls``'s MRO outside our packages that defines ``name`` itself."""
    for base in cls.__mro__:
        if not base.__module__.startswith(OURS) and name in vars(base):
            return base
    return None


def _check_override(ours: str, name: str, params: tuple[str, ...]) -> None:
    """``ours`` overrides or calls ``name`` of an upstream class, passing ``params`` first: that method exists there
    with those leading parameters."""
    cls = _load(ours)
    owner = _upstream_owner(cls, name)
    assert owner is not None, f"no upstream base of {ours} defines {name} any more (we override or call it)"
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    leading = [p for p in inspect.signature(getattr(owner, name)).parameters if p not in ("self", "cls")]
    assert leading[: len(params)] == list(params), f"{where} takes {leading}; {ours} passes {list(params)} first"


def _check_attributes(cls: type, names: tuple[str, ...], what: str) -> None:
    """Each of ``names`` is assigned as ``self.<name>`` somewhere in ``cls``'s upstream classes' source."""
    source = "".join(
        inspect.getsource(base) for base in cls.__mro__ if base.__module__.startswith(("transformers", "vllm"))
    )
    missing = [name for name in names if f"self.{name} " not in source and f"self.{name}:" not in source]
    assert not missing, f"{cls.__module__}.{cls.__qualname__} no longer sets {missing}, which {what} reads"


# ----------------------------------------------------------------------------------------------------------------------
# transformers

TRANSFORMERS_OVERRIDES = [
    # (our class, upstream method, the parameters we pass first)
    ("visionzip.hf.llava:VisionZipLlavaProcessor", "_get_num_multimodal_tokens", ("image_sizes",)),
    ("visionzip.hf.llava_next:VisionZipLlavaNextProcessor", "_get_num_multimodal_tokens", ("image_sizes",)),
    (
        "visionzip.hf.llava_onevision:VisionZipLlavaOnevisionProcessor", "_get_num_multimodal_tokens",
        ("image_sizes", "video_sizes"),
    ),
    ("visionzip.hf.qwen2_vl:VisionZipQwen2VLProcessor", "_get_num_multimodal_tokens", ("image_sizes",)),
    ("visionzip.hf.qwen2_vl:VisionZipQwen2_5_VLProcessor", "_get_num_multimodal_tokens", ("image_sizes",)),
    ("visionzip.hf.video_llava:VisionZipVideoLlavaProcessor", "_process_videos", ("videos",)),
    ("visionzip.hf.llava:VisionZipLlavaProcessor", "replace_image_token", ("image_inputs", "image_idx")),
    ("visionzip.hf.qwen2_vl:VisionZipQwen2VLProcessor", "replace_video_token", ("video_inputs", "video_idx")),
    (
        "visionzip.hf.qwen2_vl:VisionZipQwen2VLForConditionalGeneration", "_prepare_position_ids_for_generation",
        ("inputs_tensor", "model_kwargs"),
    ),
    (
        "visionzip.hf.qwen2_vl:VisionZipQwen2_5_VLForConditionalGeneration", "_prepare_position_ids_for_generation",
        ("inputs_tensor", "model_kwargs"),
    ),
    (
        "visionzip.hf.qwen2_vl:VisionZipQwen2VLForConditionalGeneration",
        "_prepare_multimodal_encoder_kwargs_for_generation", ("model_kwargs",),
    ),
    ("visionzip.hf.qwen2_vl:VisionZipQwen2VLModel", "get_image_features", ("pixel_values", "image_grid_thw")),
    ("visionzip.hf.qwen2_vl:VisionZipQwen2VLModel", "get_video_features", ("pixel_values_videos", "video_grid_thw")),
    ("visionzip.hf.llava:VisionZipLlavaModel", "get_image_features", ("pixel_values",)),
]  # fmt: skip
TRAINER_OVERRIDES = [
    ("_get_train_sampler", ("train_dataset",)),
    ("_save", ("output_dir", "state_dict")),
    ("_load_from_checkpoint", ("resume_from_checkpoint", "model")),
]


@pytest.mark.parametrize(("ours", "name", "params"), TRANSFORMERS_OVERRIDES, ids=lambda v: str(v).split(":")[-1])
def test_transformers_overrides(ours: str, name: str, params: tuple[str, ...]) -> None:
    _check_override(ours, name, params)


def test_generation_mixin_positions() -> None:
    """The Qwen override calls ``GenerationMixin._prepare_position_ids_for_generation`` directly (the text
    positions) and relies on the encoder kwargs step leaving its outputs under ``mm_encoder_outputs``."""
    from transformers.generation import GenerationMixin

    method = GenerationMixin._prepare_position_ids_for_generation
    assert list(inspect.signature(method).parameters)[1:3] == ["inputs_tensor", "model_kwargs"]
    source = inspect.getsource(GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation)
    assert "mm_encoder_outputs" in source, "the encoder outputs' key in model_kwargs moved (visionzip/hf/qwen2_vl.py)"


@pytest.mark.parametrize(("name", "params"), TRAINER_OVERRIDES, ids=[name for name, _ in TRAINER_OVERRIDES])
def test_trainer_overrides(name: str, params: tuple[str, ...]) -> None:
    """``llava.train.trainer.LlavaTrainer`` overrides these of transformers' ``Trainer``."""
    from transformers import Trainer

    assert name in vars(Trainer), f"transformers.Trainer.{name} is gone (llava/train/trainer.py overrides it)"
    leading = [p for p in inspect.signature(getattr(Trainer, name)).parameters if p != "self"]
    assert leading[: len(params)] == list(params), f"Trainer.{name} takes {leading}, LlavaTrainer passes {params}"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_owned_decoder_loop_reads(family: str) -> None:
    """What the owned decoder loop (``visionzip.hf.pruned``: FastV, PDrop, SparseVLM in our LLaVA and in
    ``visionzip.hf.inllm``) reads of a transformers decoder: its embeddings, layers, norm and rotary module, each
    layer's input norm and attention projections, the layer call's keywords and ``create_causal_mask``'s."""
    from transformers.masking_utils import create_causal_mask

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    where = "visionzip/hf/pruned/decoder.py"
    _check_attributes(getattr(module, f"{prefix}Model"), ("embed_tokens", "layers", "norm", "rotary_emb"), where)
    layer = getattr(module, f"{prefix}DecoderLayer")
    _check_attributes(layer, ("self_attn", "input_layernorm"), "visionzip/hf/pruned/cuts.py")
    attention = getattr(module, f"{prefix}Attention")
    _check_attributes(attention, ("q_proj", "k_proj", "head_dim", "scaling"), "visionzip/hf/pruned/cuts.py")
    called = set(inspect.signature(layer.forward).parameters)
    assert {"attention_mask", "position_embeddings", "position_ids", "past_key_values"} <= called, called
    mask_params = set(inspect.signature(create_causal_mask).parameters)
    assert {"config", "inputs_embeds", "attention_mask", "past_key_values", "position_ids"} <= mask_params


def test_llava_language_model_seam() -> None:
    """``visionzip.hf.inllm`` swaps the inner LLaVA models' ``language_model`` after their ``__init__`` and hands it
    ``image_ids`` through ``forward``'s keyword arguments."""
    from transformers import LlavaModel, LlavaNextModel, VideoLlavaModel

    for cls in (LlavaModel, LlavaNextModel, VideoLlavaModel):
        assert "self.language_model = " in inspect.getsource(cls.__init__), f"{cls.__name__} builds no language_model"
        source = inspect.getsource(cls.forward)
        assert "self.language_model(" in source and "**kwargs" in source.split("self.language_model(")[1]


def test_qwen_vision_hooks() -> None:
    """What ``visionzip.hf.qwen2_vl`` reads on the Qwen2-VL / Qwen2.5-VL vision towers: ``blocks[-1].attn`` with
    ``qkv``, ``num_heads``, ``scaling`` and the forward keywords ``cu_seqlens`` and ``position_embeddings`` (a
    pre-hook takes them), ``spatial_merge_size`` (2.5 adds ``window_size``, ``patch_size``), the modules'
    ``apply_rotary_pos_emb_vision``, ``get_vision_window_index``, and the model's ``rope_deltas``."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    from transformers.vision_utils import get_vision_window_index

    towers = [
        (modeling_qwen2_vl, modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel, ("spatial_merge_size",)),
        (
            modeling_qwen2_5_vl, modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel,
            ("spatial_merge_size", "window_size", "patch_size"),
        ),
    ]  # fmt: skip
    for module, tower, attributes in towers:
        assert callable(getattr(module, "apply_rotary_pos_emb_vision", None)), f"{module.__name__}: rotary moved"
        _check_attributes(tower, ("blocks", *attributes), "visionzip/hf/qwen2_vl.py")
    for attention in (modeling_qwen2_vl.VisionAttention, modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention):
        _check_attributes(attention, ("qkv", "num_heads", "scaling"), "visionzip/hf/qwen2_vl.py")
        forward = inspect.signature(attention.forward).parameters
        assert {"cu_seqlens", "position_embeddings"} <= set(forward), f"{attention.__qualname__}.forward: {forward}"
    for block in (modeling_qwen2_vl.Qwen2VLVisionBlock, modeling_qwen2_5_vl.Qwen2_5_VLVisionBlock):
        _check_attributes(block, ("attn",), "visionzip/hf/qwen2_vl.py")
    window = list(inspect.signature(get_vision_window_index).parameters)
    assert window[:4] == ["grid_thw", "spatial_merge_size", "window_size", "patch_size"], window
    for model in (modeling_qwen2_vl.Qwen2VLModel, modeling_qwen2_5_vl.Qwen2_5_VLModel):
        _check_attributes(model, ("rope_deltas", "visual"), "visionzip/hf/qwen2_vl.py")


# ----------------------------------------------------------------------------------------------------------------------
# vLLM (serve venv only)

VLLM_OVERRIDES = [
    ("llava.serve.vllm.llava:VisionZipLlavaForConditionalGeneration", "_process_image_input", ("image_input",)),
    (
        "llava.serve.vllm.llava_next:VisionZipLlavaNextForConditionalGeneration", "_process_image_input",
        ("image_input",),
    ),
    ("llava.serve.vllm.llava:VisionZipLlavaProcessingInfo", "get_hf_processor", ()),
    ("llava.serve.vllm.llava:VisionZipLlavaProcessingInfo", "get_vision_encoder_info", ()),
    ("llava.serve.vllm.llava:VisionZipLlavaProcessingInfo", "get_hf_config", ()),
]  # fmt: skip


@pytest.fixture
def vllm() -> object:
    return pytest.importorskip("vllm", reason="the vLLM contract runs in the serve venv: bash scripts/setup_serve.sh")


@pytest.mark.parametrize(("ours", "name", "params"), VLLM_OVERRIDES, ids=lambda v: str(v).split(":")[-1])
def test_vllm_overrides(vllm: object, ours: str, name: str, params: tuple[str, ...]) -> None:
    _check_override(ours, name, params)


def test_vllm_processing_info(vllm: object) -> None:
    """``get_num_image_tokens`` takes keyword-only ``image_width`` and ``image_height`` (what we override); the
    context builds an HF processor from a class and keywords; a processor keeps its info as ``self.info``."""
    from vllm.model_executor.models.llava import LlavaMultiModalProcessor, LlavaProcessingInfo
    from vllm.model_executor.models.llava_next import LlavaNextProcessingInfo
    from vllm.multimodal.processing import InputProcessingContext

    for info in (LlavaProcessingInfo, LlavaNextProcessingInfo):
        params = inspect.signature(info.get_num_image_tokens).parameters
        kinds = {name: params[name].kind for name in ("image_width", "image_height") if name in params}
        assert kinds == dict.fromkeys(("image_width", "image_height"), inspect.Parameter.KEYWORD_ONLY), kinds
    assert list(inspect.signature(InputProcessingContext.get_hf_processor).parameters)[1] == "typ"
    _check_attributes(LlavaMultiModalProcessor, ("info",), "llava/serve/vllm/llava.py (StartupCheckMixin)")


def test_vllm_llava_model(vllm: object) -> None:
    """The LLaVA models keep ``vision_tower``, ``multi_modal_projector`` and ``config``, a ``hf_to_vllm_mapper`` we
    extend with ``|``, and the embedding-input types we pass through; vLLM's CLIP tower is built to
    ``num_hidden_layers_override`` with ``vision_model.encoder.layers`` and takes ``feature_select_strategy``; its
    attention has ``qkv_proj`` (hooked), ``num_heads_per_partition`` and ``scale``."""
    from vllm.model_executor.models import clip, llava, llava_next
    from vllm.model_executor.models.utils import WeightsMapper

    for model in (llava.LlavaForConditionalGeneration, llava_next.LlavaNextForConditionalGeneration):
        _check_attributes(model, ("vision_tower", "multi_modal_projector", "config"), "llava/serve/vllm/")
        assert isinstance(model.hf_to_vllm_mapper | WeightsMapper(), WeightsMapper), model.__qualname__
    assert llava.LlavaImageEmbeddingInputs and llava_next.LlavaNextImageEmbeddingInputs
    assert "num_hidden_layers_override" in inspect.signature(clip.CLIPVisionModel.__init__).parameters
    assert "feature_select_strategy" in inspect.signature(clip.CLIPVisionModel.forward).parameters
    _check_attributes(clip.CLIPVisionModel, ("vision_model",), "llava/serve/vllm/compress.py")
    _check_attributes(clip.CLIPVisionTransformer, ("encoder", "config"), "llava/serve/vllm/compress.py")
    _check_attributes(clip.CLIPEncoder, ("layers",), "llava/serve/vllm/compress.py")
    _check_attributes(clip.CLIPEncoderLayer, ("self_attn",), "llava/serve/vllm/compress.py")
    _check_attributes(
        clip.CLIPAttention, ("qkv_proj", "num_heads_per_partition", "scale"), "llava/serve/vllm/compress.py"
    )


def test_vllm_attention_backend(vllm: object) -> None:
    """The startup check (``llava.serve.vllm.llava.check_attention_backends``) reads each decoder ``Attention``
    layer's ``attn_backend`` and ``head_size`` and asks the backend ``supports_head_size``, ``get_name`` and
    ``get_supported_head_sizes``."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import AttentionBackend

    _check_attributes(Attention, ("attn_backend", "head_size"), "llava/serve/vllm/llava.py")
    for name in ("supports_head_size", "get_name", "get_supported_head_sizes"):
        assert callable(getattr(AttentionBackend, name, None)), f"vllm AttentionBackend.{name} is gone"


def test_vllm_registries(vllm: object) -> None:
    """The plugin registers through ``ModelRegistry.register_model(name, "module:Class")`` and
    ``MULTIMODAL_REGISTRY.register_processor(processor, info=..., dummy_inputs=...)``."""
    from vllm import ModelRegistry
    from vllm.multimodal import MULTIMODAL_REGISTRY

    assert list(inspect.signature(ModelRegistry.register_model).parameters)[:2] == ["model_arch", "model_cls"]
    params = inspect.signature(MULTIMODAL_REGISTRY.register_processor).parameters
    assert {"info", "dummy_inputs"} <= set(params), list(params)
