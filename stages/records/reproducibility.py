"""What two clean builds of identical inputs gave: the manifest carries it, the README explains it."""

from __future__ import annotations

from typing import Any

# What two clean builds of identical inputs gave here (scripts/remote_benchmark.py --determinism); the manifest
# carries it, the README explains it.
REPRODUCIBILITY: dict[str, Any] = {
    "byte_identical": "every file the forge writes for identical inputs: checkpoint, ONNX graphs (canonical node "
                      "order), calibration data, record.json (stage timings kept out of it, in a local .timings.json), "
                      "validation results, manifest.json, junit.xml, pipeline-check images and metrics; except:",
    "not_bit_reproducible": {
        "engine": "TensorRT-RTX 1.7.1 ahead-of-time builds: two builds of the same ONNX gave different VAE-decoder "
                  "engines for all three targets of the four RTX recipes (sm86, sm89, sm120; same size or 8 bytes "
                  "apart), while all 8 text-encoder and transformer engines (fp16, INT8 weight-only, FP8) were "
                  "identical; validate and pipeline_check keys downstream of a differing engine differ too",
    },
    "across_runners": "runners sharing a remote (FORGE_REMOTE) fetch the published entry, verified by sha256, instead "
                      "of rebuilding it: they agree on engine bytes without trusting each other's tools",
}
