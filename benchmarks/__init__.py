"""dst_kernels benchmark suite (pytest-benchmark + an interleaved ratio harness)."""
