"""How fast a device does each kind of work: the one interface the cost model times with.

:class:`Rates` answers "how many seconds" for attention tiles, matmuls, elementwise
traffic and collectives. It is built either from a device preset (datasheet peaks times
assumed efficiencies, :class:`~ctxpar.apps.plan.specs.DeviceSpec`) or from a calibrated
profile (``ctxpar plan --calibrate``, :mod:`ctxpar.apps.plan.calibrate`), whose JSON holds
linear fits ``seconds = fixed + per_call * calls + work / rate`` measured on this machine.
"""
from __future__ import annotations

import dataclasses
import json
import math

from ctxpar.apps.plan.specs import DeviceSpec
from ctxpar.apps.plan.work import device_kernel

__all__ = ["Rates", "preset_rates", "profile_rates", "load_profile"]

# Collectives the cost model times; "p2p" is one ring step's exchange.
COMM_OPS = ("p2p", "all_to_all", "all_gather", "reduce_scatter")


def _nearest(table: dict, key: float):
    """The entry of ``table`` (str keys of numbers) nearest to ``key`` on a log scale."""
    best = min(table, key=lambda k: abs(math.log(float(k)) - math.log(max(key, 1e-9))))
    return table[best]


@dataclasses.dataclass(frozen=True)
class Rates:
    """Seconds per unit of work on one device (one rank). ``attn[head_dim][kind]`` =
    ``(fixed_s, per_tile_s, flop_per_s[, per_masked_pair_s])`` for kind "fwd"/"bwd"; ``matmul[k]`` = FLOP/s of
    a matmul with inner/outer size k; ``comm[n][op]`` = ``(latency_s, bytes_per_s)`` of
    ``op`` over n ranks (key "intra"/"inter" for presets: the link crossed)."""

    name: str
    memory: float
    peak_flops: float
    attn: dict
    matmul: dict
    mem_bw: float
    comm: dict
    cores: int = 0  # 0: one device per rank (GPUs); else ranks share this many CPU cores
    sub_tile_rows: int = 512
    source: str = "preset"
    slowdown: dict = dataclasses.field(default_factory=dict)  # measured: local ranks -> factor
    load: float = 1.0  # compute slower than at calibration by this (validation tracks it)
    probe_s: float = 0.0  # the calibration's one-process probe (calibrate.probe), seconds
    kernel: str = "cuda"  # whose causal blocking times a tile (ctxpar.apps.plan.work.KERNEL_BLOCKS)
    comm_sync: dict = dataclasses.field(default_factory=dict)  # like comm, timed after compute

    def attention(self, kind: str, flops: float, tiles: int, head_dim: int, *,
                  masked_pairs: float = 0.0, calls: int = 1) -> float:
        """Seconds of ``tiles`` kernel calls of ``flops`` in all, ``masked_pairs`` of their
        pairs under dense masks (built per tile), in ``calls`` attention calls."""
        fixed, per_tile, rate, *per_masked = _nearest(self.attn, head_dim)[kind]
        return calls * fixed + per_tile * tiles + flops / rate + masked_pairs * sum(per_masked)

    def matmul_time(self, flops: float, k: int) -> float:
        return flops / _nearest(self.matmul, k)

    def elementwise(self, nbytes: float) -> float:
        return nbytes / self.mem_bw

    def comm_time(self, op: str, nbytes: float, n: int, cross_node: bool = False, *,
                  after_compute: bool = False, local_ranks: int = 0) -> float:
        """Seconds of one ``op`` receiving ``nbytes`` per rank over ``n`` ranks; with
        ``after_compute``, as the first collective after a kernel (the ranks arrive
        apart: on CPU ranks sharing cores, by the scheduler's slices). On CPU a transfer
        is CPU work, slowed by every rank sharing the cores: its cost is that measured
        with ``max(n, local_ranks)`` ranks; the wait for the group's ranks to arrive
        after compute, that measured with the group's ``n``."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        table = self.comm_sync if after_compute and self.comm_sync else self.comm
        if "intra" in table:
            lat, bw = table["inter" if cross_node else "intra"][op]
        else:
            contended = self.cores and not after_compute
            lat, bw = _nearest(table, max(n, local_ranks) if contended else n)[op]
        return lat + nbytes / bw

    def oversubscription(self, local_ranks: int) -> float:
        """How much slower each rank computes when ``local_ranks`` share the cores: the
        profile's measurement (every rank computing at once, against one process alone,
        under the machine's load at calibration), else ``local_ranks / cores``."""
        if local_ranks <= 1 or not self.cores:
            return self.load
        if str(local_ranks) in self.slowdown:
            return self.load * max(1.0, float(self.slowdown[str(local_ranks)]))
        return self.load * max(1.0, local_ranks / self.cores)

    def hides_transfers(self, local_ranks: int) -> bool:
        """Whether a transfer can run behind compute. A GPU's copy engines and NICs work
        beside its SMs; on CPU a transfer is itself CPU work (gloo's threads, the loopback
        copies), which a spare core can absorb but not one already running a rank."""
        return not self.cores or local_ranks < self.cores

    def sharing(self, active: int, local_ranks: int) -> float:
        """How much slower a rank computes while ``active`` of the ``local_ranks`` ranks
        compute at once (the others wait): :meth:`oversubscription` scaled by
        ``max(1, active / cores)`` against its value with every rank active."""
        full = self.oversubscription(local_ranks)
        if local_ranks <= 1 or not self.cores:
            return full
        return full * max(1.0, active / self.cores) / max(1.0, local_ranks / self.cores)


def preset_rates(dev: DeviceSpec) -> Rates:
    """Rates of a datasheet device at its assumed achieved fractions of peak."""
    attn = {"128": {"fwd": (0.0, 5e-6, dev.peak_flops * dev.attn_fwd_eff),
                    "bwd": (0.0, 10e-6, dev.peak_flops * dev.attn_bwd_eff)}}
    comm = {"intra": {op: (dev.intra_lat, dev.intra_bw) for op in COMM_OPS},
            "inter": {op: (dev.inter_lat, dev.inter_bw) for op in COMM_OPS}}
    return Rates(dev.name, dev.memory, dev.peak_flops, attn, {"4096": dev.peak_flops * dev.matmul_eff},
                 dev.mem_bw, comm, sub_tile_rows=dev.sub_tile_rows)


def profile_rates(profile: dict) -> Rates:
    """Rates measured by ``ctxpar plan --calibrate`` (the profile JSON as a dict)."""
    attn = {k: {kind: tuple(v[kind]) for kind in ("fwd", "bwd")} for k, v in profile["attn"].items()}

    def comm_table(table: dict) -> dict:
        return {k: {op: tuple(v[op]) for op in COMM_OPS} for k, v in table.items()}

    return Rates(profile.get("name", profile["device"]), float(profile["memory"]),
                 float(max(profile["matmul"].values())), attn, dict(profile["matmul"]),
                 float(profile["mem_bw"]), comm_table(profile["comm"]), cores=int(profile.get("cores", 0)),
                 sub_tile_rows=int(profile["sub_tile_rows"]), source="profile",
                 slowdown=dict(profile.get("slowdown", {})), probe_s=float(profile.get("probe_s", 0.0)),
                 kernel=device_kernel(profile["device"]), comm_sync=comm_table(profile.get("comm_sync", {})))


def load_profile(path: str) -> Rates:
    """:func:`profile_rates` of a JSON file; a ValueError names what is wrong."""
    try:
        with open(path) as f:
            profile = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read profile {path!r}: {e}") from None
    missing = [k for k in ("device", "memory", "attn", "matmul", "mem_bw", "comm", "sub_tile_rows")
               if k not in profile]
    if missing:
        raise ValueError(f"{path}: not a ctxpar plan profile (missing {missing}); make one with "
                         f"ctxpar plan --calibrate --out {path}")
    return profile_rates(profile)
