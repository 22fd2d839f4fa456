"""The search and what measures it: ``baseline`` (the original on the validation set) → ``run``
(the search stage: ``schedule``'s strategies over the ``prefix_cache``, each evaluation bounded by
``confidence`` and recorded in the ``ledger``; then M_opt / M_best) → ``holdout`` (the ``--test``
set, after the search).
"""
