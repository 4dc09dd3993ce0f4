"""Facts about prompt text: which language a prompt is in, whether it asks for rendered text. Stdlib only."""

from __future__ import annotations

import re

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|「([^」]+)」|『([^』]+)』|‘([^’]+)’')  # rendered text a prompt asks for


def quoted_text(prompt: str) -> list[str]:
    """The quoted segments of a prompt, in order: the text the image should render."""
    return [next(group for group in match.groups() if group) for match in QUOTED.finditer(prompt)]


def prompt_language(prompt: str) -> str:
    """'zh' when CJK characters outnumber Latin letters (an English prompt may quote a Chinese sign), else 'en'."""
    return "zh" if len(_CJK.findall(prompt)) > len(_LATIN.findall(prompt)) else "en"
