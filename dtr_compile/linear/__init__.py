"""Linear-attention students: one module per family, each with its fast forms and naive reference.

* :mod:`~dtr_compile.linear.base` — the contract every student meets (prefill and stateful forms);
* :mod:`~dtr_compile.linear.kernel` — feature-map ("kernel") linear attention, bidirectional,
  causal and sliding-window, with :mod:`~dtr_compile.linear.feature_maps`.
"""
