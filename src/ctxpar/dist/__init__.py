"""The communication layer: who is in the CP group (:mod:`~ctxpar.dist.topology`, the one
resolver of ``group=``), hierarchical meshes (:mod:`~ctxpar.dist.mesh`), counted
collectives (:mod:`~ctxpar.dist.collectives`) and the cross-rank argument check
(:mod:`~ctxpar.dist.agreement`). Imports only :mod:`ctxpar.observe`."""
