"""Device meshes for hierarchical CP (:func:`cp_mesh`); :mod:`ctxpar.dist.topology` resolves them.

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

import torch.distributed as dist

from ctxpar.dist.topology import RING, ULYSSES, is_mesh, mesh_axis_names as _names

__all__ = ["cp_mesh"]


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
