"""Which processes form the CP group: the one resolver of ``group=``.

Every public function that takes ``group=`` calls :func:`resolve` once and passes the
resulting :class:`CPTopology` down; nothing below the public entry points resolves again.
``group=`` may be:

- ``None``: the default (WORLD) group when torch.distributed is initialised, else a world
  of one, so the same user code runs in one process;
- a ``ProcessGroup`` or a 1-D ``DeviceMesh``: a 1-D CP group;
- a ``DeviceMesh`` with axes ``("ring", "ulysses")`` (:func:`ctxpar.cp_mesh`), possibly with
  outer axes such as ``("dp", "ring", "ulysses")``: hierarchical CP; the outer axes are
  independent replicas and are ignored;
- an already resolved :class:`CPTopology` or :class:`CPGroup`.

A 1-D group is a topology whose ring is the group and whose Ulysses group is trivial, so
every layout and method sees one shape of topology.
"""
from __future__ import annotations

import dataclasses

import torch.distributed as dist

__all__ = ["CPGroup", "CPTopology", "RING", "ULYSSES", "SINGLE", "is_mesh", "resolve",
           "axis_groups"]

RING, ULYSSES = "ring", "ulysses"


@dataclasses.dataclass(frozen=True)
class CPGroup:
    """A resolved 1-D communication group: the torch ProcessGroup (None for a world of
    one without torch.distributed), this process's rank in it and the group size."""

    pg: object | None
    rank: int
    size: int

    def global_rank(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` (taken modulo the group size)."""
        group_rank %= self.size
        if self.pg is None:
            return group_rank
        return dist.get_global_rank(self.pg, group_rank)


SINGLE = CPGroup(None, 0, 1)


@dataclasses.dataclass(frozen=True)
class CPTopology:
    """A CP group as two nested 1-D groups. CP rank ``ring.rank * ulysses.size +
    ulysses.rank``; a 1-D group is ``ring = group`` with a trivial Ulysses group, which
    makes every layout function agree with its 1-D definition."""

    ring: CPGroup
    ulysses: CPGroup = SINGLE
    mesh_axes: tuple[str, ...] | None = None  # the mesh's axis names; None for a 1-D group

    @property
    def is_mesh(self) -> bool:
        return self.mesh_axes is not None

    @property
    def size(self) -> int:
        return self.ring.size * self.ulysses.size

    @property
    def rank(self) -> int:
        return self.ring.rank * self.ulysses.size + self.ulysses.rank

    @property
    def sizes(self) -> list[int]:
        """``[a2a, p2p]``, Megatron's order."""
        return [self.ulysses.size, self.ring.size]

    @property
    def levels(self) -> tuple[CPGroup, ...]:
        """The non-trivial 1-D groups, innermost (Ulysses) first: a collective over each
        in turn covers the whole CP group."""
        return tuple(g for g in (self.ulysses, self.ring) if g.size > 1)


def is_mesh(group) -> bool:
    """True for a ``DeviceMesh`` (duck-typed, so that importing this module never imports
    the mesh module)."""
    return group is not None and hasattr(group, "get_group") and hasattr(group, "ndim")


def mesh_axis_names(mesh) -> tuple[str, ...]:
    return tuple(getattr(mesh, "mesh_dim_names", None) or ())


def _group(pg) -> CPGroup:
    """A ProcessGroup (None: WORLD, or a world of one without torch.distributed)."""
    if pg is None:
        if not (dist.is_available() and dist.is_initialized()):
            return SINGLE
        pg = dist.group.WORLD
    rank = dist.get_rank(pg)
    if rank < 0:
        raise ValueError(
            f"group= does not contain this process (global rank {dist.get_rank()}): every "
            f"rank that calls a ctxpar function must belong to the group it passes")
    return CPGroup(pg, rank, dist.get_world_size(pg))


def resolve(group=None) -> CPTopology:
    """``group`` -> :class:`CPTopology` (see the module docstring). Needs no communication;
    raises ``ValueError`` for a multi-dimensional mesh without ``ring``/``ulysses`` axes,
    or a group that does not contain this process."""
    if isinstance(group, CPTopology):
        return group
    if isinstance(group, CPGroup):
        return CPTopology(group)
    if not is_mesh(group):
        return CPTopology(_group(group))
    if group.ndim == 1:
        return CPTopology(_group(group.get_group()))
    names = mesh_axis_names(group)
    missing = [a for a in (RING, ULYSSES) if a not in names]
    if missing:
        raise ValueError(
            f"a {group.ndim}-D DeviceMesh passed as group= must have axes 'ring' and "
            f"'ulysses' (see ctxpar.cp_mesh); got axes {names or None}, missing {missing}. "
            f"For a 1-D method pass one axis, e.g. mesh['cp']")
    if names.index(RING) > names.index(ULYSSES):
        raise ValueError(f"the 'ulysses' axis must be inside the 'ring' axis; got axes {names}")
    return CPTopology(_group(group[RING].get_group()), _group(group[ULYSSES].get_group()), names)


def axis_groups(group=None) -> list[CPGroup]:
    """The non-trivial 1-D groups whose successive sums make a sum over *every* rank of
    ``group``: a 1-D group gives itself; a ``DeviceMesh`` of any dimension one group per
    axis (data-parallel axes included, unlike :func:`resolve`); a list or tuple the groups
    of each element. For gradient and loss reductions (:mod:`ctxpar.loss`)."""
    if isinstance(group, (list, tuple)):
        return [g for item in group for g in axis_groups(item)]
    if is_mesh(group) and group.ndim > 1:
        return [g for g in (_group(group.get_group(i)) for i in range(group.ndim)) if g.size > 1]
    if isinstance(group, CPTopology):
        return list(group.levels)
    return list(resolve(group).levels)
