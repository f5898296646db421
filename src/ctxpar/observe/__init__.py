"""Observation without side effects: communication and compute counters
(:mod:`~ctxpar.observe.counters`), ring step timelines (:mod:`~ctxpar.observe.trace`) and
activation memory (:mod:`~ctxpar.observe.memory`). The bottom layer: imports no other
ctxpar package."""
