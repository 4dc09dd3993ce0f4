"""Model families, registered here by name; each family is a folder (see `qwen_image/`), its types in `base.py`.

Adding a family (Qwen-Image-Edit, Flux) is a sibling folder plus one entry in FAMILIES. Import-light: the
recipe schema, the task graph and the manifest read it without loading torch.
"""

from __future__ import annotations

from types import ModuleType

from stages.families import qwen_image
from stages.families.base import ALL_SURGERY, DEFAULT_FAMILY, ComponentInfo, Family

__all__ = ["ALL_COMPONENTS", "ALL_SURGERY", "DEFAULT_FAMILY", "FAMILIES", "ComponentInfo", "Family", "component_module"]

FAMILIES: dict[str, Family] = {family.name: family for family in (qwen_image.FAMILY,)}
ALL_COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.components))


def component_module(component: str, family: str = DEFAULT_FAMILY) -> ModuleType:
    return FAMILIES[family].module(component)
