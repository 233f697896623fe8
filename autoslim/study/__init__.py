"""The Optuna side: a study's spec, task, evaluation, storage, workers, trial, loop and store.

The only package that imports Optuna's study machinery to write; it never imports the read side
(:mod:`autoslim.results`, :mod:`autoslim.report`). Modules: ``spec`` (StudySpec, TOML; no torch),
``task`` (the task a study searches: data, teacher, bound space, baseline, size glue, screen),
``evaluation`` (one candidate), ``storage`` (RDB, fingerprint, lookup), ``workers`` (budget,
liveness, healing), ``status``, ``trial`` (the objective), ``run`` (the loop), ``store`` (the
artifact store), ``sensitivity`` (greedy seeds).
"""
