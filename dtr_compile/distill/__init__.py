"""Stage 5, distill: each attention site's linear student, trained locally on its teacher.

``plan`` (settings, targets, cache keys) → ``activations`` (the teacher's tensors) → ``train``
(one site's loop) → ``execute`` (workers) → ``run`` (:func:`~dtr_compile.distill.run.distill`,
the entry point), with ``cache`` (distilled weights by key).
"""
