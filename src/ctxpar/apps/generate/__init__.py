"""``ctxpar generate``: prefill held-out recall prompts under CP and decode the answers
(:mod:`~ctxpar.apps.generate.run` the command, :mod:`~ctxpar.apps.generate.worker` the rank side)."""
