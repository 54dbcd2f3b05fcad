"""bitfit_fast_benches: the benchmark harness behind `bitfit-fast bench` and `pytest benches/`, and the reference
BitFit that the tests compare with (Liger's rule: tests and benchmarks share one baseline).

Installed beside bitfit_fast from ``benches/bitfit_fast_benches`` (the library does not import it):

- ``presets``: model shapes, workloads (model, sequence length, batch) and the named presets; the synthetic models
  and batches a workload runs on.
- ``reference``: plain PyTorch BitFit (every non-bias, non-head weight frozen), used by the tests and by the
  ``reference`` providers.
- ``providers``: what is compared (reference eager or compiled, full fine-tuning, bitfit_fast per memory mode),
  each as a model with its optimizer and training step.
- ``measurement``: step timing, peak memory (GPU allocator, or the peak RSS of a fresh process on CPU), model
  FLOPs, the measured matmul peak and the largest batch that fits.
- ``runner``: a preset run end to end, steps of all providers alternating, every ratio to the reference.
- ``report``: the project's goals, JSON / Markdown / PNG results and README's generated section.

This module imports nothing, so the CLI can list the presets without loading the harness.
"""
