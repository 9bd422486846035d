"""benchmarks/gpu.py is meant for a CUDA machine, which CI does not have: its wiring (every method under a
switch, the JVP table, the profiles) runs here on CPU at toy size, so it does not rot between GPU sessions.
No timing is asserted.  Three methods cover the three kinds of iteration: a teacher call (CD), a JVP (sCT), a second
time input with a JVP (FACM)."""

from pathlib import Path

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["cd", "sct", "facm"]


def test_gpu_benchmark_writes_a_row_per_method_and_the_jvp_table_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    gpu.main(["--device", "cpu", "--config", str(ROOT / "config/config.yaml"), "--dataset", "digits", "--batch", "4",
              "--repeats", "1", "--switches", "fp32", "bf16", "--methods", *METHODS, "--compile-methods",
              "--out", str(out)])
    text = out.read_text()
    for switch in ("fp32", "bf16"):
        for name in ["teacher", *METHODS]:
            rows = [ln for ln in text.splitlines() if ln.startswith(f"| {name} | {switch} |")]
            assert len(rows) == 1 and "failed" not in rows[0], (name, switch, rows)
    assert "| forward-mode AD, dual tensors (default) |" in text
    assert text.count("Profile of one") == 2
