"""The node boundary of hierarchical CP (issue 15): a Ulysses group must be the ranks of one
node. Four ranks play two nodes of two (torchrun's ``GROUP_RANK``, set per rank here as two
agents would): ``cp_mesh`` accepts ``[2, 2]`` (Ulysses pairs {0,1}, {2,3}: one node each),
refuses ``[4, 1]`` and a node layout that interleaves ranks, on every rank, and builds
them when ``allow_cross_node_ulysses=True``."""
import os

import pytest

import ctxpar


def _mesh_on_nodes(sizes, node_of_rank, allow=False):
    import torch.distributed as dist

    rank = dist.get_rank()
    old = os.environ.get("GROUP_RANK")
    os.environ["GROUP_RANK"] = str(node_of_rank[rank])
    try:
        mesh = ctxpar.cp_mesh(hierarchical_context_parallel_sizes=sizes,
                              allow_cross_node_ulysses=allow)
        return ("ok", mesh["ulysses"].mesh.tolist())
    except ValueError as e:
        return ("refused", str(e))
    finally:
        if old is None:
            del os.environ["GROUP_RANK"]
        else:
            os.environ["GROUP_RANK"] = old


BLOCKS = [0, 0, 1, 1]  # ranks 0, 1 on node 0; 2, 3 on node 1 (torchrun's assignment)


def test_ulysses_pairs_within_nodes_are_accepted(run_ranks):
    out = run_ranks(4, _mesh_on_nodes, [2, 2], BLOCKS)
    assert [o[0] for o in out] == ["ok"] * 4
    assert [o[1] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.parametrize("sizes,nodes,group", [([4, 1], BLOCKS, "[0, 1, 2, 3]"),
                                               ([2, 2], [0, 1, 0, 1], "[0, 1]")],
                         ids=["a2a-4-on-2-nodes", "interleaved-nodes"])
def test_ulysses_group_across_nodes_is_refused_on_every_rank(run_ranks, sizes, nodes, group):
    out = run_ranks(4, _mesh_on_nodes, sizes, nodes)
    assert [o[0] for o in out] == ["refused"] * 4, out
    assert all(f"Ulysses group of ranks {group} spans nodes" in o[1]
               and "allow_cross_node_ulysses=True" in o[1] for o in out), out[0]


def test_cross_node_ulysses_when_allowed(run_ranks):
    out = run_ranks(4, _mesh_on_nodes, [4, 1], BLOCKS, allow=True)
    assert [o[0] for o in out] == ["ok"] * 4
