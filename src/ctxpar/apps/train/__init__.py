"""``ctxpar train``: the run (:mod:`~ctxpar.apps.train.run`), the recall task and model (:mod:`~ctxpar.apps.train.task`) and the report (:mod:`~ctxpar.apps.train.report`)."""
