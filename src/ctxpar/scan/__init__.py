"""Differentiable exclusive scans across the ranks of a CP group.

Elements and the operator
-------------------------
An *element* is one contiguous run of the sequence held by one rank (a segment of
:meth:`ctxpar.sequence.spec.ShardSpec.runs`); the global scan order is the order of the runs
in the sequence. With N ranks:

- ``layout="contiguous"``: one element per rank, rank r holds element r.
- ``layout="zigzag"``: rank r holds elements r and 2N-1-r (the block order of the zigzag
  sequence layout, see :mod:`ctxpar.sequence.layouts`); ``values`` carries a leading dim of 2 in
  local order.
- On a ``("ring", "ulysses")`` mesh, CP rank ``r * a2a + u`` holds the runs of its piece
  of ring rank r's shard (for zigzag, a leading dim of m = 1 or 2 runs; :func:`owners`).

Element q acts on a state as ``S -> a_q * S + D_q``, or ``S -> D_q`` where its reset flag
``f_q`` is set (the state restarts at element q):

- sum: ``a_q = 1``;
- affine / decayed: ``a_q = decay_q`` (any shape that broadcasts against ``D_q``);
- segmented: ``f_q = reset_q`` (with a decay or without).

Applying element 1 then element 2 composes as ``(a1, D1) then (a2, D2) = (a2*a1, a2*D1 + D2)``,
and with resets as ``(f1 or f2, f2 ? D2 : a2*D1 + D2)``. A reset *selects* D2; it never scales
the old state by a zero coefficient, since 0 * inf = NaN would carry a non-finite value
(say one packed document's overflow) across the reset into every later element, and
likewise backwards through the gradients. The *exclusive* scan returns, for each
element q, ``S_q = sum_{p<q} (prod_{p<k<q} a_k) D_p``: element q's own D never enters its
own prefix. Nothing is ever computed as an inclusive scan minus the element itself, so a
prefix is exact up to the rounding of the sums it contains. ``reverse=True`` scans from the
last element to the first: ``T_q = sum_{p>q} (prod_{q<k<p} a_k) D_p``.

Autograd: the backward of an exclusive scan is the reverse exclusive scan of the output
gradients with the same ``a`` and resets (``dD_q = T_q``), and ``d a_q = T_q * S_q``, or 0
where element q resets (its ``a_q`` multiplies no state).

Algorithms (all give the same result up to the order of the additions)
------------------------------------------------------------------------
================  =========================  ===========================================
``allgather``     1 round                    every rank receives the (N-1) other summaries
``hillis_steele`` ceil(log2 M) rounds        one summary per round (log-step windows)
``ring``          M-1 serial hops            the carry walks the element order once
================  =========================  ===========================================

On a mesh only ``allgather`` runs (Ulysses group, then ring). For 1-D zigzag, M = 2N and
the ring's carry goes up ranks 0..N-1 and back down: both P2P algorithms are written once
for an arbitrary owner map. ``allgather`` alone can be left in flight (:func:`start_scan`)
so that its communication overlaps local work.

Carries are accumulated and communicated in float32 (float64 for float64 input); results
come back in the input dtype.
"""
from ctxpar.scan.autograd import exclusive_scan, exclusive_sum
from ctxpar.scan.engine import ALGORITHMS, PendingScan, owners, owners_of_runs, start_scan

__all__ = ["ALGORITHMS", "PendingScan", "exclusive_scan", "exclusive_sum", "owners",
           "owners_of_runs", "start_scan"]
