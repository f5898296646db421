"""Device meshes for hierarchical CP (:func:`cp_mesh`); :mod:`ctxpar.dist.topology` resolves them.

A hierarchical CP mesh has two axes, outermost first: ``("ring", "ulysses")``, of sizes
``(p2p, a2a)``. ``ulysses`` is the innermost axis, so a Ulysses group is made of
*consecutive* global ranks (the same node: the all-to-alls, which move the most bytes,
stay on the fast links) and a ring group strides across nodes. Rank ``(r, u)`` of the CP
mesh is CP rank ``r * a2a + u``.

Data parallelism composes by adding outer axes: a 3-D mesh ``("dp", "ring", "ulysses")``
holds ``dp`` independent CP meshes side by side; every ctxpar function taking ``group=``
uses only the ``ring``/``ulysses`` axes of the mesh slice this rank belongs to.

Node boundary: :func:`cp_mesh` checks, once per mesh, that every Ulysses group lies within
one node (the node of a rank: torchrun's ``GROUP_RANK``, the rank of its agent, and the
hostname) and raises ``ValueError`` on every rank otherwise, unless
``allow_cross_node_ulysses=True``.

Nothing is cached here: a mesh is resolved into its process groups on every call
(DeviceMesh slicing creates no new process group, so it needs no communication).
"""
from __future__ import annotations

import os
import socket

import torch.distributed as dist

from ctxpar.dist.topology import RING, ULYSSES, is_mesh, mesh_axis_names as _names

__all__ = ["cp_mesh", "node_of_this_rank", "check_ulysses_within_nodes"]


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


def node_of_this_rank() -> str:
    """This process's node: the hostname, and torchrun's ``GROUP_RANK`` (its agent's rank)
    when set, so that two agents on one machine count as two nodes, as they are laid out."""
    group = os.environ.get("GROUP_RANK")
    return socket.gethostname() + (f"/node{group}" if group is not None else "")


def check_ulysses_within_nodes(mesh) -> None:
    """Collective over the world (one ``all_gather_object``): raise the same ``ValueError``
    on every rank if a Ulysses group of any rank's 2-D ``("ring", "ulysses")`` ``mesh``
    spans more than one node (:func:`node_of_this_rank`)."""
    mine = [int(r) for r in mesh[ULYSSES].mesh.flatten().tolist()]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (node_of_this_rank(), mine))
    node = {r: key for r, (key, _) in enumerate(gathered)}
    for group in sorted({tuple(g) for _, g in gathered}):
        if len({node[r] for r in group}) > 1:
            raise ValueError(
                f"the Ulysses group of ranks {list(group)} spans nodes "
                f"{[node[r] for r in group]}: its all-to-alls would cross the slow link. "
                f"Make a2a divide the ranks per node (LOCAL_WORLD_SIZE="
                f"{os.environ.get('LOCAL_WORLD_SIZE', '?')}), or pass "
                f"allow_cross_node_ulysses=True")


def cp_mesh(hierarchical_context_parallel_sizes, *, device_type: str = "cpu", mesh=None,
            allow_cross_node_ulysses: bool = False):
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

        allow_cross_node_ulysses: skip the node check (:func:`check_ulysses_within_nodes`),
            which otherwise refuses a mesh whose Ulysses group spans two nodes.

    Creating a mesh is collective: every rank of the world must call this with the same
    arguments. The argument checks happen before any collective and the node check
    decides on every rank's gathered view, so bad input raises the same ``ValueError`` on
    every rank instead of hanging.
    """
    made = _cp_mesh(hierarchical_context_parallel_sizes, device_type, mesh)
    if not allow_cross_node_ulysses:
        check_ulysses_within_nodes(made)
    return made


def _cp_mesh(hierarchical_context_parallel_sizes, device_type: str, mesh):
    """:func:`cp_mesh` without the node check."""
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
