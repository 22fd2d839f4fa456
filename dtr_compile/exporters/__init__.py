"""The export stage (``stage``): the prefill artifacts (``artifacts``: ``onnx``, ``fused``,
``tensorrt``), then a causal model's stateful decoders (``decoders`` over ``stateful``).
"""
