import os

import pytest
import torch

from bitfit_fast_benches.presets import PRESETS

# Which preset's workloads the pytest-benchmark suite runs: BITFIT_BENCH_PRESET, else the device's default.
PRESET_NAME = os.environ.get("BITFIT_BENCH_PRESET", "gpu-base" if torch.cuda.is_available() else "cpu-small")
PRESET = PRESETS[PRESET_NAME]


@pytest.fixture(scope="session")
def preset():
    if PRESET.device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"preset {PRESET_NAME} needs a CUDA GPU")
    return PRESET
