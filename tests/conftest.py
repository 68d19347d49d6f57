from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import build_adapter, build_model, save_base

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    """A tiny sharded bf16 Llama base and an r=8 adapter on q/v/down_proj (shared, never modify)."""
    root = tmp_path_factory.mktemp("llama_pair")
    model = build_model("llama", torch.bfloat16)
    base = save_base(model, root / "base", shard="60KB")
    adapter = build_adapter(model, root / "ad", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    return base, adapter


@pytest.fixture
def pair_copy(llama_pair, tmp_path):
    """A private copy of ``llama_pair`` a test may corrupt."""
    import shutil

    base, adapter = llama_pair
    b, a = tmp_path / "base", tmp_path / "ad"
    shutil.copytree(base, b)
    shutil.copytree(adapter, a)
    return b, a
