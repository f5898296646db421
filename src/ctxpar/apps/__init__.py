"""The applications on top of the library: the ``ctxpar`` command line
(:mod:`~ctxpar.apps.cli`), local rank pools (:mod:`~ctxpar.apps.launch`), and its
subcommands ``verify`` (:mod:`~ctxpar.apps.verify`), ``train`` (:mod:`ctxpar.apps.train`)
and ``bench`` (:mod:`ctxpar.apps.bench`). The top layer: nothing in the library imports it."""
