"""What runs inside instrumented models, below both front ends.

The capture state (``state``), the eager taps (``taps``), the compile-clean ``kfc::record`` op and its site keys
(``record``), the self-attention decomposition (``attention``) and the run-time half of opaque calls (``opaque``).
"""
