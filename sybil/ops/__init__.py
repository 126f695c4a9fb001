"""The lowest layer: which kernel computes each op (dispatch), the C++ kernels' build
and CPU flags (native, csrc/), and memory placement (huge pages). Imports nothing
of Sybil but errors."""
