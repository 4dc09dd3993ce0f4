"""Typed records stages hand to each other and to the manifest (stored as JSON in an entry's record).

A stage returns one of these; the record stores `model_dump(mode="json")`; readers (the manifest, the audit,
later stages) parse it back with `model_validate`, so a renamed field fails loudly instead of turning into None.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def dump(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


class Tolerances(Record):
    """A gate in the reference's own units: errors as fractions of the reference output's scale, so one gate means
    the same at the tiny model's width and the release's, where hidden states are orders of magnitude larger."""

    max_error: float  # max|diff| / max|reference|
    rms_error: float  # rms(diff) / rms(reference): the relative L2 error
    cosine: float


class WouldPass(Record):
    """The loosest gate this comparison needed: what a recipe would have to allow for it to pass."""

    max_error: float
    rms_error: float
    cosine: float


class Comparison(Record):
    """One output of one runner against another, worst case over all validation cases."""

    runner: str
    against: str
    gated: bool  # only the built graph and the engine against the PyTorch reference gate the build
    output: str
    max_abs_diff: float
    mean_abs_diff: float
    reference_max_abs: float  # the scale the errors are relative to (smallest over the cases)
    reference_rms: float
    max_error: float  # worst case's max|diff| / max|reference|
    rms_error: float  # worst case's rms(diff) / rms(reference)
    min_cosine_similarity: float
    tolerance: Tolerances
    error_passed: bool
    cosine_passed: bool
    would_pass_with: WouldPass
    passed: bool


class EngineRun(Record):
    ran: bool
    skipped_because: str | None = None


class OnnxRuntimeRun(Record):
    onnx: str  # the graph, relative to the artifacts root
    ran: bool
    execution: str | None = None  # how ORT ran it (Q/DQ as float arithmetic, default optimizations); None: older record
    parts: int | None = None  # the engine's block-range parts: ORT ran their graphs chained (block-wise: segments)


class FreezingEffect(Record):
    max_abs_diff_frozen: float
    max_abs_diff_unfrozen: float
    cosine_frozen: float
    cosine_unfrozen: float
    cosine_gain_from_freezing: float


class BlockError(Record):
    """Error after one block, worst over the validation cases: the stream that reaches the output (the
    transformer's image stream, the text encoder's hidden states) and, for the transformer, the text stream
    (absent after the last block, whose text branch is dead compute)."""

    block: int
    max_abs_diff: float
    cosine: float
    text_max_abs_diff: float | None = None
    text_cosine: float | None = None


class ValidationReport(Record):
    component: str
    passed: bool
    reference: str
    runners: list[str]
    onnxruntime: OnnxRuntimeRun
    engine: EngineRun
    cases: list[str]
    # cases whose activations would exceed validate.case_memory_gib (a native size at release width on CPU)
    cases_not_run: list[str] = []
    comparisons: list[Comparison]  # gated
    measured_against_comparison_graphs: list[Comparison]  # measured, not gated
    freezing_effect: dict[str, FreezingEffect] | None = None
    results_file: str
    blockwise: bool = False
    blocks: list[BlockError] | None = None
    # LoRA cases (engines with LoRA inputs): the synthetic files bound, their reference diffusers + PEFT
    lora: dict[str, Any] | None = None
    failure: str | None = None
