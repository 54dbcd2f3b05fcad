"""The ahead-of-time compile check, `python -m bitfit_fast_kernels.aot`, on a fast subset of its variants.

The full check (every config x dtype x flag set, a few minutes on 2 cores) runs by hand or in a GPU-less release
step; here one variant of each kernel compiles for sm_90 through the same entry point (~20 s), and the verdict
logic and the variant list are checked without compiling anything.
"""

import re
import subprocess
import sys

import pytest

from bitfit_fast_kernels import aot, heads, layer_norm, linear, task_tables

pytestmark = pytest.mark.aot

# One variant per kernel, each the one BERT training runs most: FC1's forward, its gradient pass, and the
# residual LayerNorm pair with dropout (its backward also summing the feeding linear's bias gradient); and the two
# forwards with per-row task biases (TaskBank's mixed batches) and their gradient's per-task sums (loops over
# the tasks of a chunk, data-dependent bounds), alone and in FC1's gradient pass and the LayerNorm backward; the
# q/k/v gradient gather of padded batches.
SUBSET = [
    "linear_fwd bf16 128x128x64 s4 w8 bias gelu preact",
    "linear_grad bf16 gelu store_g db",
    "linear_grad bf16 per_task gelu store_g db",
    "ln_bwd bf16 N=768 per_task dropout dx sum_dx",
    "ln_fwd bf16 N=768 residual dropout",
    "ln_bwd bf16 N=768 dropout dx sum_dx",
    "ln_bwd bf16 N=768 fp32_stream dy_gemm gemm_dx dropout dx sum_dx",  # a fused layer's under autocast
    "ln_fwd bf16 N=768 fp32_stream y_gemm residual dropout",
    "linear_fwd bf16 128x128x64 s4 w8 row_bias gelu preact",
    "ln_fwd bf16 N=768 row_beta residual dropout",
    "heads_to_rows bf16 slots db",
    "task_sums bf16 chunks",
    "task_sums fp32 pieces",
]


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("aot")
    command = [sys.executable, "-m", "bitfit_fast_kernels.aot", "--dump", str(dump)]
    for name in SUBSET:
        command += ["--only", name]
    # The environment keeps TRITON_INTERPRET=1 (conftest): the check must leave the interpreter by itself.
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return run, dump


def test_subset_compiles_for_sm90_without_spills(aot_run):
    run, _ = aot_run
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == f"aot: {len(SUBSET)}/{len(SUBSET)} variants compiled for sm_90", run.stdout
    for name in SUBSET:
        (line,) = [line for line in lines if f" {name} " in line]
        assert line.startswith("OK ") and re.search(r"spill +0 B", line), line
    gemms = [line for line in lines if "linear_fwd" in line]
    assert len(gemms) == 2 and all(gemm.endswith("wgmma") for gemm in gemms), (
        f"the bf16 GEMMs must use Hopper's warpgroup MMA, the per-row task bias gather included: {gemms}")


def test_linear_kernels_address_rows_in_int64(aot_run):
    # Row index times row length must be an i64 multiply ([BLOCK_M, 1] row tensors): M * N passes 2**31 at
    # 700k tokens of a 3072-wide layer, and the Philox counters are built from the same product.
    _, dump = aot_run
    for kernel, variants in (("linear_fwd", 2), ("linear_grad", 2)):
        dumps = list(dump.glob(f"{kernel}_*.ttir"))
        assert len(dumps) == variants
        for ttir in dumps:
            row_products = re.findall(r"arith\.muli .*: tensor<\d+x1xi(\d+)>", ttir.read_text())
            assert row_products and set(row_products) == {"64"}, f"{ttir.name}: row offsets in i{row_products}"


@pytest.mark.parametrize(
    "result,expected",
    [
        ({"regs": 128, "spill": 0, "smem": 131072}, "OK"),
        ({"regs": 255, "spill": 516, "smem": 98304}, "SPILL"),
        ({"regs": 255, "spill": -1, "smem": 98304}, "SPILL"),  # no ptxas log: unknown is not a pass
        ({"regs": 200, "spill": 0, "smem": 262144}, "SMEM"),
        ({"error": "PTXASError: ptxas fatal"}, "FAIL"),
        ({"regs": 72, "spill": 0, "smem": 1024, "loaded_regs": 72, "loaded_local_bytes": 0}, "OK"),
        ({"regs": 72, "spill": 0, "smem": 1024, "loaded_regs": 80, "loaded_local_bytes": 0}, "LOAD"),
        ({"regs": 72, "spill": 0, "smem": 1024, "load_error": "CUDA_ERROR_OUT_OF_RESOURCES"}, "LOAD"),
    ],
)
def test_verdict(result, expected):
    assert aot.verdict(dict(result, name="k", mma="wgmma")) == expected


def test_every_kernel_has_variants():
    # A kernel added to kernels/ without an entry in the check would never be compiled before it meets a GPU.
    kernels = {
        obj.fn if hasattr(obj, "configs") else obj  # an Autotuner wraps the jitted function
        for module in (linear, layer_norm, heads, task_tables)
        for name, obj in vars(module).items()
        if name.endswith("_kernel")
    }
    covered = {v.fn for v in aot.all_variants()}
    assert kernels == covered
    names = [v.name for v in aot.all_variants()]
    assert len(names) == len(set(names)), "variant names must be unique: --only selects by them"


def test_output_lines_parse_back_and_another_machines_run_compares(tmp_path):
    """--compare FILE: the real compile on a GPU machine against the ahead-of-time output committed from this one."""
    ours = [dict(name="linear_grad bf16 gelu store_g db", regs=72, spill=0, smem=1024, mma="no MMA"),
            dict(name="linear_fwd bf16 128x128x64 s4 w8 bias", regs=168, spill=0, smem=131072, mma="wgmma",
                 loaded_regs=168, loaded_local_bytes=0),
            dict(name="ln_bwd bf16 N=768 dx", regs=40, spill=0, smem=16, mma="no MMA")]
    for result in ours:
        assert aot.parse_line(aot.format_result(result)) == (result["name"], {k: result[k] for k in aot.RESOURCES})
    assert aot.parse_line("aot: 3/3 variants compiled for sm_90") is None
    theirs = [dict(ours[0]), dict(ours[1], regs=154), dict(name="ln_fwd bf16 N=768", regs=30, spill=0, smem=0,
                                                           mma="no MMA")]
    reference = tmp_path / "aot-gpu.txt"
    reference.write_text("triton 3.6.0: 3 variants\n" + "\n".join(map(aot.format_result, theirs)) + "\n")
    assert aot.differences(ours, str(reference)) == [
        "linear_fwd bf16 128x128x64 s4 w8 bias: regs 154 -> 168",
        f"ln_bwd bf16 N=768 dx: not in {reference}",
    ]
