from __future__ import annotations

from pathlib import Path

import torch

from stages.checkpoint import SaveTinyCheckpoint
from stages.families.qwen_image import transformer as qwen_image


def test_saved_tiny_checkpoint_reloads_the_exact_weights(tmp_path: Path) -> None:
    report = SaveTinyCheckpoint(seed=5)(tmp_path)
    assert report["model"] == "tiny" and report["seed"] == 5
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    reloaded = qwen_image.load(tmp_path)
    fresh = qwen_image.make_tiny_transformer(5)
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
