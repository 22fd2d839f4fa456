"""The export stage (``stage``): the prefill artifacts (``artifacts``: ``onnx``, ``fused``,
``tensorrt``), then a causal model's stateful decoders (``decoders`` over ``stateful``, whose
one-token and prefill graphs ``phases`` merges under one ``If``).
"""
