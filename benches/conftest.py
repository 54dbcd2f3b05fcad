import os
import shlex

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


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """--benchmark-json files name what they ran on as the bench's results JSON do: device, versions, the commit
    (BITFIT_FAST_COMMIT where the checkout has no history of its own, as on a GPU machine), command and date."""
    from bitfit_fast_benches.runner import environment

    output_json["bitfit_fast"] = environment(shlex.join(["pytest", *config.invocation_params.args]))
