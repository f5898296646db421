"""``ctxpar train``: the command (:mod:`~ctxpar.apps.train.run`), its flags and checks
(:mod:`~ctxpar.apps.train.config`), the rank side (:mod:`~ctxpar.apps.train.worker`), the
recall task and model (:mod:`~ctxpar.apps.train.task`) and the report
(:mod:`~ctxpar.apps.train.report`)."""
