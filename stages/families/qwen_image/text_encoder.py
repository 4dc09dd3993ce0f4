"""Qwen-Image text encoder quirks: Qwen2.5-VL's language model at a fixed sequence length, and prompt embeddings.

QwenImagePipeline runs the whole ``Qwen2_5_VLForConditionalGeneration`` and keeps ``hidden_states[-1]`` (the
final-norm output). For text-only prompts the vision tower and the LM head do nothing for that output, so the
engine is the language model alone: ``input_ids`` and ``attention_mask`` [B, text_length + 34] in, the last
hidden state out. The pipeline's post-processing (drop the 34 template tokens, re-pad, mask) is not in the
graph; :func:`prompt_embeds_from_hidden_states` does it on the host, for the validation and for runtimes.

Multimodal RoPE: without image/video grids transformers gives every token position ``arange(L)`` on all three
mRoPE axes, ignoring the attention mask. The graph computes the same (:func:`text_position_ids`); right padding
(see ``qwen_tokenizer``) keeps real tokens at 0..n-1, as for an unpadded prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from stages.families.qwen_image import tokenizer as qwen_tokenizer
from stages.families.qwen_image.shards import ShardReader, one_block_at_a_time

TEXT_ENCODER_SUBFOLDER = "text_encoder"

# Same architecture as the released text_encoder (GQA, mRoPE, vocabulary 152064) at test size; hidden_size is
# the tiny transformer's joint_attention_dim, since the transformer consumes these embeddings.
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
    },
    "vision_config": {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": 16,
        "fullatt_block_indexes": [0],
    },
}

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["hidden_states"]
TEXT_BRANCH_PATTERNS: list[str] = []
TEXT_AXES = {"input_ids": 1, "attention_mask": 1}
text_axis_length = qwen_tokenizer.sequence_length

_CHECKPOINT_ATTRIBUTE = "forge_checkpoint_dir"

ENGLISH_PROMPTS = [
    "A cozy coffee shop at dawn, warm light through tall windows, a grey cat asleep on a wooden chair.",
    "Aerial photograph of a winding river through autumn forests, mist over the water, ultra detailed.",
]
CHINESE_PROMPTS = [
    "一只橘猫坐在窗台上，窗外是下雪的城市夜景，暖黄色的灯光，电影感构图。",
    "江南水乡的清晨，石桥、乌篷船和白墙黛瓦倒映在平静的河面上，水墨画风格。",
]
RENDERED_TEXT_PROMPTS = [
    'A neon sign above a rainy diner door that reads "OPEN 24 HOURS", with the slogan "Best Pie in Town" below.',
    "书法作品：宣纸上用毛笔写着“春风得意”四个大字，左下角盖着红色印章，旁边小字写着“二〇二五年春”。",
    '一张电影海报，标题写着 "Qwen-Image"，副标题为“通义千问 · 图像生成”，背景是璀璨星空。',
]


def make_tiny_text_encoder(seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """The real transformers class at test size, so CI runs the released text encoder's code paths."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_TEXT_ENCODER_CONFIG))
    return model.float().eval()


def load(checkpoint_dir: str | Path) -> Qwen2_5_VLForConditionalGeneration:
    """Load ``text_encoder/`` of a diffusers-layout checkpoint offline in fp32 (the reference precision).

    The whole model is loaded, as the pipeline does, so the reference is exactly its ``hidden_states[-1]``;
    the checkpoint directory is remembered so validation can use the checkpoint's own ``tokenizer/``.
    """
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        checkpoint_dir, subfolder=TEXT_ENCODER_SUBFOLDER, dtype=torch.float32, local_files_only=True
    )
    setattr(model, _CHECKPOINT_ATTRIBUTE, Path(checkpoint_dir))
    return model.eval()


def load_meta(checkpoint_dir: str | Path) -> Qwen2_5_VLForConditionalGeneration:
    """The model's structure and config without its weights (no memory): enough to make validation cases, with
    the checkpoint directory remembered so the cases use its own tokenizer."""
    config = Qwen2_5_VLConfig.from_pretrained(Path(checkpoint_dir) / TEXT_ENCODER_SUBFOLDER, local_files_only=True)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    setattr(model, _CHECKPOINT_ATTRIBUTE, Path(checkpoint_dir))
    return model


def architecture(checkpoint_dir: str | Path) -> Qwen2_5_VLForConditionalGeneration:
    """The class built from `text_encoder/config.json` in fp32, no weights read (see the export stage)."""
    config = Qwen2_5_VLConfig.from_pretrained(Path(checkpoint_dir) / TEXT_ENCODER_SUBFOLDER, local_files_only=True)
    return Qwen2_5_VLForConditionalGeneration(config).float().eval()


def checkpoint_keys(model: Qwen2_5_VLForConditionalGeneration) -> dict[str, str]:
    """{parameter name: safetensors key}: transformers loads the released layout (`model.layers.*`) into
    `model.language_model.*` and saves it back the same way; its own reverse mapping says which key is which."""
    from transformers.core_model_loading import revert_weight_conversion

    parameters = dict(model.named_parameters(remove_duplicate=False))
    saved = revert_weight_conversion(model, dict(parameters))
    by_id = {id(tensor): key for key, tensor in saved.items()}
    return {name: by_id.get(id(tensor), name) for name, tensor in parameters.items()}


def tokenizer_for(model: Qwen2_5_VLForConditionalGeneration) -> Qwen2Tokenizer:
    """The checkpoint's tokenizer for a loaded model; Qwen's real vocabulary rebuilt offline for a fresh tiny one."""
    checkpoint_dir = getattr(model, _CHECKPOINT_ATTRIBUTE, None)
    if checkpoint_dir is None:
        return qwen_tokenizer.build_qwen_tokenizer()
    return qwen_tokenizer.load_tokenizer(checkpoint_dir)


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """mRoPE positions [3, B, L] transformers uses for text-only input: 0..L-1 on every axis, mask ignored.

    (``Qwen2_5_VLModel.compute_3d_position_ids`` returns None without image/video grids, and the text model
    then falls back to ``arange``.) Only the mask's shape is used, so the graph's positions match whichever
    side the padding is on.
    """
    batch, length = attention_mask.shape
    positions = torch.arange(length, device=attention_mask.device, dtype=torch.long)
    return positions.view(1, 1, length).expand(3, batch, length)


class ExportableTextEncoder(nn.Module):
    """Engine signature around the stock language model: token ids and mask in, last hidden state out."""

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration) -> None:
        super().__init__()
        self.language_model = model.model.language_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=text_position_ids(attention_mask),
            use_cache=False,
        )
        return output.last_hidden_state


@contextlib.contextmanager
def export_wrapper(model: Qwen2_5_VLForConditionalGeneration) -> Iterator[nn.Module]:
    yield ExportableTextEncoder(model).eval()


def example_inputs(model: Qwen2_5_VLForConditionalGeneration, text_length: int) -> dict[str, torch.Tensor]:
    """Trace inputs at the fixed length; batch 2 with one right-padded row so batch stays dynamic."""
    length = qwen_tokenizer.sequence_length(text_length)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.text_config.vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.int64)
    attention_mask[1, length // 2 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def dynamic_shapes() -> dict[str, dict[int, Any]]:
    """Batch only: the sequence is always text_length + 34 (fixed tokenizer padding)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=64)
    return {"input_ids": {0: batch}, "attention_mask": {0: batch}}


def profile_shapes(profile: Any, text_length: int, config: dict[str, Any]) -> dict[str, list[tuple[int, ...]]]:
    """min/opt/max shapes of both inputs for a recipe profile; only `profile.batch` matters here."""
    length = qwen_tokenizer.sequence_length(text_length)
    levels = [(getattr(profile.batch, level), length) for level in ("min", "opt", "max")]
    return {name: list(levels) for name in INPUT_NAMES}


def text_encoder_engine_inputs(input_ids: Any, attention_mask: Any) -> dict[str, np.ndarray]:
    """Turn tokenizer output (torch, numpy or lists; [B, text_length + 34]) into the engine's int64 input dict."""
    feed = {"input_ids": _as_int64(input_ids), "attention_mask": _as_int64(attention_mask)}
    if feed["input_ids"].ndim != 2 or feed["input_ids"].shape != feed["attention_mask"].shape:
        raise ValueError(
            f"`input_ids` {feed['input_ids'].shape} and `attention_mask` {feed['attention_mask'].shape} must both be "
            "[batch, text_length + 34]"
        )
    return feed


def _as_int64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value).astype(np.int64))


def prompt_embeds_from_hidden_states(hidden_states: Any, attention_mask: Any, text_length: int) -> tuple[Any, Any]:
    """QwenImagePipeline's post-processing of the text encoder output, at a fixed length.

    ``hidden_states`` [B, text_length + 34, D] (the engine output or ``hidden_states[-1]``) and the
    ``attention_mask`` fed to the encoder give ``prompt_embeds`` [B, text_length, D] and ``prompt_embeds_mask``
    [B, text_length] (int64). As in ``_get_qwen_prompt_embeds``: each row's real tokens are gathered in order,
    the first 34 (template prefix) dropped, the rest left-aligned, and the tail zero-filled and masked with 0 —
    but always padded to ``text_length`` instead of the batch's longest prompt. Accepts torch tensors or numpy
    arrays and returns the same kind.
    """
    as_numpy = isinstance(hidden_states, np.ndarray)
    hidden = torch.from_numpy(hidden_states) if as_numpy else hidden_states
    mask = torch.as_tensor(np.asarray(attention_mask) if as_numpy else attention_mask, device=hidden.device).bool()
    _check_embedding_shapes(hidden, mask, text_length)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    gathered = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    kept = gathered[:, qwen_tokenizer.PROMPT_TEMPLATE_DROP :]
    real = (mask.sum(dim=1) - qwen_tokenizer.PROMPT_TEMPLATE_DROP).clamp(min=0)
    embeds_mask = torch.arange(text_length, device=hidden.device).unsqueeze(0) < real.unsqueeze(1)
    embeds = torch.where(embeds_mask.unsqueeze(-1), kept, torch.zeros((), dtype=kept.dtype, device=kept.device))
    embeds_mask = embeds_mask.long()
    if as_numpy:
        return embeds.numpy(), embeds_mask.numpy()
    return embeds, embeds_mask


def _check_embedding_shapes(hidden: torch.Tensor, mask: torch.Tensor, text_length: int) -> None:
    length = qwen_tokenizer.sequence_length(text_length)
    if hidden.ndim != 3 or hidden.shape[1] != length:
        raise ValueError(f"`hidden_states` must be [batch, text_length + 34 = {length}, dim], got {tuple(hidden.shape)}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"`attention_mask` must be [batch, {length}] like `hidden_states`, got {tuple(mask.shape)}")


def encode_prompts(
    model: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer, prompts: str | Sequence[str], text_length: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """PyTorch reference for a runtime: prompts -> (prompt_embeds, prompt_embeds_mask, truncated_counts)."""
    input_ids, attention_mask, truncated = qwen_tokenizer.tokenize_prompts(tokenizer, prompts, text_length)
    hidden = pipeline_hidden_states(model, input_ids, attention_mask)
    embeds, embeds_mask = prompt_embeds_from_hidden_states(hidden, attention_mask, text_length)
    return embeds, embeds_mask, truncated


def pipeline_hidden_states(
    model: Qwen2_5_VLForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The stock full model called as QwenImagePipeline calls it; its ``hidden_states[-1]``."""
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return output.hidden_states[-1]


def validation_cases(model: Qwen2_5_VLForConditionalGeneration, settings: Any, text_length: int) -> list[dict[str, Any]]:
    """Real prompts through the real tokenizer, padded to the fixed length, `settings.batch` per case.

    English, Chinese and rendered-text prompts; one prompt longer than `text_length` (cut, as the pipeline
    would); and random vocabulary ids (seeded by `settings.seed`) with `settings.text_tokens[i]` real prompt
    tokens per row, which reaches embedding rows ordinary prompts never touch.
    """
    tokenizer = tokenizer_for(model)
    batch = settings.batch
    prompt_sets = {
        "English prompts": ENGLISH_PROMPTS,
        "Chinese prompts": CHINESE_PROMPTS,
        "rendered-text prompts (English and Chinese)": RENDERED_TEXT_PROMPTS,
        f"a prompt longer than text_length {text_length} (cut) and a short one": [_long_prompt(text_length), CHINESE_PROMPTS[0]],
    }
    cases = [case for name, prompts in prompt_sets.items() for case in _prompt_cases(tokenizer, name, prompts, batch, text_length)]
    cases.append(_random_token_case(tokenizer, settings, text_length, model.config.text_config.vocab_size))
    return cases


def _prompt_cases(
    tokenizer: Qwen2Tokenizer, name: str, prompts: Sequence[str], batch: int, text_length: int
) -> list[dict[str, Any]]:
    """Every prompt of the set appears at least once; the last batch wraps around to fill up."""
    starts = range(0, len(prompts), batch)
    cases = []
    for number, start in enumerate(starts, 1):
        chosen = [prompts[(start + index) % len(prompts)] for index in range(batch)]
        input_ids, attention_mask, _ = qwen_tokenizer.tokenize_prompts(tokenizer, chosen, text_length)
        part = f" (part {number} of {len(starts)})" if len(starts) > 1 else ""
        cases.append(_case(f"{name}{part}, batch {batch}", input_ids, attention_mask))
    return cases


def _long_prompt(text_length: int) -> str:
    sentence = "A lighthouse on a rocky coast at sunset, waves crashing, seagulls overhead. 海浪拍打着礁石。 "
    return sentence * (text_length // 8 + 2)


def _random_token_case(tokenizer: Qwen2Tokenizer, settings: Any, text_length: int, vocab_size: int) -> dict[str, Any]:
    prefix, suffix = qwen_tokenizer.template_ids(tokenizer)
    generator = torch.Generator().manual_seed(settings.seed)
    counts = [settings.text_tokens[index % len(settings.text_tokens)] for index in range(settings.batch)]
    sequences = []
    for count in counts:
        content = torch.randint(0, min(vocab_size, qwen_tokenizer.QWEN_BPE_RANKS), (max(count - len(suffix), 0),), generator=generator)
        sequences.append((prefix + content.tolist() + suffix)[: len(prefix) + count])
    input_ids, attention_mask, _ = qwen_tokenizer.pad_token_ids(tokenizer, sequences, text_length)
    return _case(f"random vocabulary tokens (seed {settings.seed}), {counts} prompt tokens", input_ids, attention_mask)


def _case(description: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    return {
        "description": description,
        "call": {"input_ids": input_ids, "attention_mask": attention_mask},
        "feed": text_encoder_engine_inputs(input_ids, attention_mask),
    }


def reference_outputs(model: Qwen2_5_VLForConditionalGeneration, case: dict[str, Any]) -> dict[str, np.ndarray]:
    """Reference for the validate stage: :func:`pipeline_hidden_states` of the case's call, in fp32."""
    return {"hidden_states": pipeline_hidden_states(model, **case["call"]).float().numpy()}


def export_extras(checkpoint_dir: str | Path, out_dir: Path, text_length: int) -> dict[str, Any]:
    """Ship the tokenizer and its fixed-padding settings beside the ONNX, so a runtime reproduces the inputs."""
    import json

    tokenizer = qwen_tokenizer.load_tokenizer(checkpoint_dir)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    padding = {
        "max_length": qwen_tokenizer.sequence_length(text_length),
        "text_length": text_length,
        "padding": "max_length",
        "truncation": True,
        "padding_side": tokenizer.padding_side,
        "pad_token": tokenizer.pad_token,
        "prompt_template": qwen_tokenizer.PROMPT_TEMPLATE,
        "prompt_template_drop": qwen_tokenizer.PROMPT_TEMPLATE_DROP,
        "tokenize_function": _reference(qwen_tokenizer.tokenize_prompts),
        "embeds_function": _reference(prompt_embeds_from_hidden_states),
    }
    (out_dir / "tokenizer" / "forge_padding.json").write_text(json.dumps(padding, indent=2) + "\n")
    return {"tokenizer": "tokenizer", "padding": padding}


# -- block-wise validation at scale (see stages/graphs/blockwise.py) ---------------------------------------------------

def blockwise_reference(checkpoint_dir: str | Path, case: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]],
                                                                                  dict[str, np.ndarray]]:
    """:func:`reference_outputs` in fp32 with one decoder layer's weights in memory at a time (:func:`layer_by_layer`).
    Returns every layer's output hidden states and the final output."""
    with layer_by_layer(checkpoint_dir) as hidden_states:
        hidden, layers = hidden_states(**case["call"])
    return layers, {"hidden_states": hidden.float().numpy()}


@contextlib.contextmanager
def layer_by_layer(checkpoint_dir: str | Path) -> Iterator[Any]:
    """:func:`pipeline_hidden_states` in fp32, one decoder layer's weights in memory at a time, for any number of
    calls: yields `hidden_states(input_ids=, attention_mask=) -> (hidden_states[-1], every layer's output)`.

    Only the language model is materialised (the vision tower and the LM head do nothing for ``hidden_states[-1]``
    and are never read): the embedding and final norm up front, each decoder layer from the shards just before it
    runs, dropped right after. ``Qwen2_5_VLModel`` is called exactly as the full model calls it, minus the LM head.
    """
    model = load_meta(checkpoint_dir)
    language_model = model.model.language_model
    language_model.rotary_emb = type(language_model.rotary_emb)(config=language_model.config)
    reader = ShardReader(Path(checkpoint_dir) / TEXT_ENCODER_SUBFOLDER)
    prefix = _language_model_prefix(model, reader)
    reader.load(language_model.embed_tokens, f"{prefix}embed_tokens.")
    reader.load(language_model.norm, f"{prefix}norm.")
    with one_block_at_a_time(reader, language_model.layers, f"{prefix}layers.", _hidden_states) as captured, \
            torch.no_grad():

        def hidden_states(**call: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, np.ndarray]]]:
            captured.clear()
            output = model.model(**call, output_hidden_states=True)
            return output.hidden_states[-1], list(captured)

        yield hidden_states


def _language_model_prefix(model: Qwen2_5_VLForConditionalGeneration, reader: ShardReader) -> str:
    """`model.` in the released layout, `model.language_model.` in one saved under transformers' module names."""
    name = "model.language_model.norm.weight"
    key = checkpoint_keys(model).get(name, name)
    return (key if key in reader.where else name)[: -len("norm.weight")]


def _hidden_states(output: torch.Tensor) -> dict[str, np.ndarray]:
    return {"hidden_states": output.float().numpy().copy()}


def _reference(function: Any) -> str:
    """`module:function`, as the runtime contract names a function for users to import."""
    return f"{function.__module__}:{function.__qualname__}"
