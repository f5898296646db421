"""The sequence layer: which tokens each CP rank holds. Layouts as objects
(:mod:`~ctxpar.sequence.layouts`), the one token-order model
(:mod:`~ctxpar.sequence.spec`), sharding and gathering (:mod:`~ctxpar.sequence.sharding`),
packed documents and padding (:mod:`~ctxpar.sequence.packing`). Imports only
:mod:`ctxpar.dist` and below."""
