"""Which Qwen-Image transformer modules make up the text stream, by name (stdlib only: the GPU fit check reads
it while a recipe loads, the surgery stage when it freezes that branch)."""

from __future__ import annotations

# Nodes whose module path matches one of these belong to the text stream (see NOTES: the last block's
# text branch is dead compute but still part of the stream).
TEXT_BRANCH_PATTERNS: list[str] = [
    r"(^|[/.])txt_norm([/.]|$)",
    r"(^|[/.])txt_in([/.]|$)",
    r"(^|[/.])txt_mod([/.]|$)",
    r"(^|[/.])txt_norm1([/.]|$)",
    r"(^|[/.])txt_norm2([/.]|$)",
    r"(^|[/.])add_q_proj([/.]|$)",
    r"(^|[/.])add_k_proj([/.]|$)",
    r"(^|[/.])add_v_proj([/.]|$)",
    r"(^|[/.])norm_added_q([/.]|$)",
    r"(^|[/.])norm_added_k([/.]|$)",
    r"(^|[/.])to_add_out([/.]|$)",
    r"(^|[/.])txt_mlp([/.]|$)",
]
