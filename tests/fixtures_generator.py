"""Session-scoped fixtures of the generator package, shared by all test modules.

* `base_model_dir`: the converted SmolLM2-135M-Instruct folder (`ensure_base_model()`).
* `synthetic_library`: a small synthetic LoRA library (SmolLM2 shapes, q_proj + v_proj).
* `tiny_generator_ckpt`: a small generator checkpoint trained on that library in well under a
  minute on a 2-core CPU; serving tests load it with `generator.Generator.load`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from generator.base_model import ensure_base_model

    return ensure_base_model()


@pytest.fixture(scope="session")
def synthetic_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from generator.library import make_synthetic_library

    return make_synthetic_library(tmp_path_factory.mktemp("library"), num_tasks=8, descriptions_per_task=2, seed=0)
