"""``ctxpar plan``: a calibrated cost model of CP training steps and prefills (see README)."""
