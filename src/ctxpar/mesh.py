"""Device meshes for hierarchical CP, and resolving ``group=`` into CP sub-groups.

A hierarchical CP mesh has two axes, outermost first: ``("ring", "ulysses")``, of sizes
``(p2p, a2a)``. ``ulysses`` is the innermost axis, so a Ulysses group is made of
*consecutive* global ranks (the same node: the all-to-alls, which move the most bytes,
stay on the fast links) and a ring group strides across nodes. Rank ``(r, u)`` of the CP
mesh is CP rank ``r * a2a + u``.

Data parallelism composes by adding outer axes: a 3-D mesh ``("dp", "ring", "ulysses")``
holds ``dp`` independent CP meshes side by side; every ctxpar function taking ``group=``
uses only the ``ring``/``ulysses`` axes of the mesh slice this rank belongs to.

Nothing is cached here: a mesh is resolved into its process groups on every call
(DeviceMesh slicing creates no new process group, so it needs no communication).
"""
from __future__ import annotations

import dataclasses

import torch.distributed as dist

from .comms import CPGroup, resolve_group

__all__ = ["cp_mesh", "CPTopology", "resolve_topology", "is_mesh", "RING", "ULYSSES"]

RING, ULYSSES = "ring", "ulysses"
_SINGLE = CPGroup(None, 0, 1)


def is_mesh(group) -> bool:
    """True for a ``DeviceMesh`` (duck-typed, so no import of the mesh module is needed)."""
    return group is not None and hasattr(group, "get_group") and hasattr(group, "ndim")


def _names(mesh) -> tuple[str, ...]:
    return tuple(getattr(mesh, "mesh_dim_names", None) or ())


def _check_sizes(sizes) -> tuple[int, int]:
    try:
        a2a, p2p = (int(s) for s in sizes)
    except (TypeError, ValueError):
        raise ValueError(
            f"hierarchical_context_parallel_sizes must be [a2a, p2p] (two positive ints); "
            f"got {sizes!r}") from None
    if a2a < 1 or p2p < 1 or [a2a, p2p] != [s for s in sizes]:
        raise ValueError(
            f"hierarchical_context_parallel_sizes must be [a2a, p2p] (two positive ints); "
            f"got {sizes!r}")
    return a2a, p2p


def cp_mesh(hierarchical_context_parallel_sizes, *, device_type: str = "cpu", mesh=None):
    """A 2-D ``DeviceMesh`` with axes ``("ring", "ulysses")`` of shape ``(p2p, a2a)``.

    Args:
        hierarchical_context_parallel_sizes: ``[a2a, p2p]`` (Megatron's order): the
            Ulysses (all-to-all) degree and the ring (peer-to-peer) degree. ``a2a * p2p``
            must equal the CP world.
        device_type: ``"cpu"`` or ``"cuda"``, for a new mesh.
        mesh: build from an existing mesh instead of the whole world:

            - a mesh that already has ``ring`` and ``ulysses`` axes: their sizes are
              checked and its ``["ring", "ulysses"]`` slice is returned;
            - a 1-D mesh (the CP group): split into ``(p2p, a2a)``;
            - a mesh with a ``"cp"`` axis (e.g. ``("dp", "cp")``): that axis is split into
              ``("ring", "ulysses")`` and this rank's 2-D CP slice is returned.

    Creating a mesh is collective: every rank of the world must call this with the same
    arguments. Every check happens before any collective, so bad input raises the same
    ``ValueError`` on every rank instead of hanging.
    """
    a2a, p2p = _check_sizes(hierarchical_context_parallel_sizes)
    if mesh is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("ctxpar.cp_mesh needs an initialised torch.distributed process group "
                             "(it builds a DeviceMesh over the world)")
        world = dist.get_world_size()
        if a2a * p2p != world:
            raise ValueError(
                f"hierarchical_context_parallel_sizes {[a2a, p2p]} multiply to {a2a * p2p}, "
                f"but the CP world has {world} ranks; a2a * p2p must equal {world}")
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (p2p, a2a), mesh_dim_names=(RING, ULYSSES))
    if not is_mesh(mesh):
        raise ValueError(f"mesh= must be a DeviceMesh; got {type(mesh).__name__}")
    names = _names(mesh)
    if RING in names and ULYSSES in names:
        got = (mesh.size(names.index(RING)), mesh.size(names.index(ULYSSES)))
        if got != (p2p, a2a):
            raise ValueError(
                f"mesh has ring={got[0]}, ulysses={got[1]}, which does not match "
                f"hierarchical_context_parallel_sizes {[a2a, p2p]} (ring=p2p={p2p}, "
                f"ulysses=a2a={a2a})")
        return mesh if mesh.ndim == 2 and names == (RING, ULYSSES) else mesh[RING, ULYSSES]
    if mesh.ndim == 1 or "cp" in names:
        dim = 0 if mesh.ndim == 1 else names.index("cp")
        size = mesh.size(dim)
        if a2a * p2p != size:
            raise ValueError(
                f"hierarchical_context_parallel_sizes {[a2a, p2p]} multiply to {a2a * p2p}, "
                f"but the CP axis of the mesh has {size} ranks; a2a * p2p must equal {size}")
        if not names:
            raise ValueError("mesh= needs mesh_dim_names to be split into ('ring', 'ulysses')")
        # Collective over the whole root mesh: every rank creates every sub-group.
        split = mesh._unflatten(dim, (p2p, a2a), (RING, ULYSSES))
        return split if split.ndim == 2 else split[RING, ULYSSES]
    raise ValueError(
        f"mesh= must have axes ('ring', 'ulysses'), be 1-D, or have a 'cp' axis; got a "
        f"{mesh.ndim}-D mesh with axes {names or None}")


@dataclasses.dataclass(frozen=True)
class CPTopology:
    """A CP group as two nested 1-D groups. CP rank ``ring.rank * ulysses.size +
    ulysses.rank``; a 1-D group is ``ring = group`` with a trivial Ulysses group, which
    makes every layout function agree with its 1-D definition."""

    ring: CPGroup
    ulysses: CPGroup
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


def resolve_topology(group=None) -> CPTopology:
    """``group`` -> :class:`CPTopology`.

    Accepts None, a ProcessGroup, a :class:`~ctxpar.comms.CPGroup`, a 1-D DeviceMesh, or a
    DeviceMesh with ``ring`` and ``ulysses`` axes (any other axes, e.g. ``dp``, are
    independent replicas and are ignored). Raises ``ValueError`` for a multi-dimensional
    mesh without those axes. Needs no communication."""
    if isinstance(group, CPTopology):
        return group
    if not is_mesh(group) or group.ndim == 1:
        return CPTopology(resolve_group(group), _SINGLE)
    names = _names(group)
    missing = [a for a in (RING, ULYSSES) if a not in names]
    if missing:
        raise ValueError(
            f"a {group.ndim}-D DeviceMesh passed as group= must have axes 'ring' and "
            f"'ulysses' (see ctxpar.cp_mesh); got axes {names or None}, missing {missing}. "
            f"For a 1-D method pass one axis, e.g. mesh['cp']")
    if names.index(RING) > names.index(ULYSSES):
        raise ValueError(f"the 'ulysses' axis must be inside the 'ring' axis; got axes {names}")
    ring = resolve_group(group[RING])
    uly = resolve_group(group[ULYSSES])
    return CPTopology(ring, uly, names)
