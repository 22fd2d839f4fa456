"""Stage 7, heal: the recovery stage (``--heal``), and the rounds that let more sites fit.

After the search commits sites, the hybrid's linear students are trained jointly, end to end,
against the original model's outputs on the calibration set; the search then runs again from the
healed hybrid over the remaining sites, and so on, in rounds.

``loss`` (the teacher's targets, recorded once, and the losses) → ``adapters`` (optional
low-rank adapters on each student's q, k, v and output) → ``train`` (:func:`~dtr_compile.heal.
train.heal`, one heal) → ``rounds`` (search → heal → search …), with ``cache`` (healed weights by
key).
"""
