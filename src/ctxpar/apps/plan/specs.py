"""What ``ctxpar plan`` is asked about: the model, the run, the cluster and its devices.

Frozen dataclasses validated in ``__post_init__`` (a bad value is a ``ValueError`` naming
it), presets typed in from published configurations and vendor datasheets (the source is
beside each), and an HF ``config.json`` loader. Nothing here computes a cost.
"""
from __future__ import annotations

import dataclasses
import json
import os

__all__ = ["ModelSpec", "RunSpec", "DeviceSpec", "ClusterSpec", "MODELS", "DEVICES",
           "model_from_config", "get_model", "get_device", "DTYPE_BYTES"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Llama/Qwen-style decoder: ``layers`` x (attention with ``heads`` query and
    ``kv_heads`` K/V heads of ``head_dim``, gated MLP of width ``ffn``), ``vocab`` logits."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied: bool = False

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab"):
            if getattr(self, f) < 1:
                raise ValueError(f"model {self.name!r}: {f} must be >= 1, got {getattr(self, f)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model {self.name!r}: heads={self.heads} is not a multiple of "
                             f"kv_heads={self.kv_heads}")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def params(self) -> int:
        """Parameter count (norm weights included, no biases)."""
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2
        layer = attn + 3 * h * self.ffn + 2 * h
        emb = self.vocab * h * (1 if self.tied else 2)
        return self.layers * layer + emb + h


# Published configurations (the models' HF config.json files).
MODELS = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": ModelSpec("llama3-8b", 32, 4096, 32, 8, 14336, 128256),
    # meta-llama/Meta-Llama-3-70B config.json
    "llama3-70b": ModelSpec("llama3-70b", 80, 8192, 64, 8, 28672, 128256),
    # meta-llama/Llama-3.1-405B config.json
    "llama3-405b": ModelSpec("llama3-405b", 126, 16384, 128, 8, 53248, 128256),
    # meta-llama/Llama-2-7b-hf config.json
    "llama2-7b": ModelSpec("llama2-7b", 32, 4096, 32, 32, 11008, 32000),
    # Qwen/Qwen3-4B, Qwen3-8B, Qwen3-14B config.json (head_dim 128 explicit)
    "qwen3-4b": ModelSpec("qwen3-4b", 36, 2560, 32, 8, 9728, 151936, head_dim=128, tied=True),
    "qwen3-8b": ModelSpec("qwen3-8b", 36, 4096, 32, 8, 12288, 151936, head_dim=128),
    "qwen3-14b": ModelSpec("qwen3-14b", 40, 5120, 40, 8, 17408, 151936, head_dim=128),
    # ctxpar train's model (apps/train/task.py build_model: intermediate = 2 x hidden;
    # vocab of its default RecallTask)
    "tiny": ModelSpec("tiny", 2, 64, 4, 4, 128, 153),
}


def model_from_config(path: str) -> ModelSpec:
    """A :class:`ModelSpec` from an HF ``config.json`` (a file, or a folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read model config {path!r}: {e}") from None
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"{path}: not a decoder config.json, missing {missing}")
    return ModelSpec(os.path.basename(os.path.dirname(os.path.abspath(path))) or "config",
                     cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                     cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                     cfg["intermediate_size"], cfg["vocab_size"], head_dim=cfg.get("head_dim") or 0,
                     tied=bool(cfg.get("tie_word_embeddings", False)))


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by name, else an HF config.json path; a ValueError names the presets."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    if os.path.exists(name_or_path):
        return model_from_config(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: use a preset ({', '.join(MODELS)}) or the "
                     f"path of an HF config.json")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training step (or one prefill): ``batch`` sequences of ``seq_len`` tokens per
    CP group; ``window`` a causal sliding window (0: none); ``docs`` packed document
    lengths (empty: one plain sequence); ``ttt_layers`` the In-Place TTT layers' indices."""

    seq_len: int
    batch: int = 1
    dtype: str = "bfloat16"
    causal: bool = True
    window: int = 0
    docs: tuple[int, ...] = ()
    ttt_layers: tuple[int, ...] = ()
    ttt_chunk: int = 1024
    prefill: bool = False
    sharding: str = "fsdp"  # parameters/grads/optimizer: "fsdp" over dp x cp, or "replicated"

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.batch < 1:
            raise ValueError(f"seq_len and batch must be >= 1, got {self.seq_len} and {self.batch}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0: none), got {self.window}")
        if self.docs and sum(self.docs) != self.seq_len:
            raise ValueError(f"document lengths sum to {sum(self.docs)}, not seq_len={self.seq_len}")
        if any(n < 1 for n in self.docs):
            raise ValueError(f"document lengths must be >= 1, got {self.docs}")
        if self.sharding not in ("fsdp", "replicated"):
            raise ValueError(f"sharding must be 'fsdp' or 'replicated', got {self.sharding!r}")

    @property
    def elem(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def window_pair(self) -> tuple[int, int]:
        """flash-attn convention ``(left, right)``; (-1, -1) without a window."""
        return (self.window, 0) if self.window else (-1, -1)

    @property
    def cu_seqlens(self) -> tuple[int, ...] | None:
        if not self.docs:
            return None
        cu = [0]
        for n in self.docs:
            cu.append(cu[-1] + n)
        return tuple(cu)


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or a calibrated CPU process): dense peak FLOP/s in the run's
    dtype, memory, per-direction bandwidths of the intra-node link (NVLink) and of the
    network per device, and the fractions of peak that kernels achieve (assumptions,
    replaced by a calibrated profile's measurements)."""

    name: str
    peak_flops: float
    memory: float  # bytes
    intra_bw: float  # bytes/s per direction
    inter_bw: float  # bytes/s per direction
    mem_bw: float = 3.35e12  # HBM bytes/s (elementwise ops)
    intra_lat: float = 5e-6
    inter_lat: float = 15e-6
    matmul_eff: float = 0.70
    attn_fwd_eff: float = 0.60
    attn_bwd_eff: float = 0.45
    sub_tile_rows: int = 512

    def __post_init__(self) -> None:
        for f in ("peak_flops", "memory", "intra_bw", "inter_bw"):
            if getattr(self, f) <= 0:
                raise ValueError(f"device {self.name!r}: {f} must be > 0")


_G, _T = 1e9, 1e12
# Vendor datasheets, SXM parts, dense (no sparsity) BF16 tensor-core FLOP/s; NVLink
# bandwidth halved to one direction; network = one NIC per GPU of the reference systems
# (DGX H100/H200/B200: ConnectX-7 400 Gb/s; DGX A100: ConnectX-6 200 Gb/s). The achieved
# fractions are assumptions (FlashAttention-3 reports ~60-75% of H100 peak forward and
# ~45-55% backward in BF16).
DEVICES = {
    "h100": DeviceSpec("H100-SXM5-80GB", 989 * _T, 80 * _G, 450 * _G, 50 * _G, 3.35 * _T),
    "h200": DeviceSpec("H200-SXM-141GB", 989 * _T, 141 * _G, 450 * _G, 50 * _G, 4.8 * _T),
    "b200": DeviceSpec("B200-180GB", 2250 * _T, 180 * _G, 900 * _G, 50 * _G, 8.0 * _T),
    "a100": DeviceSpec("A100-SXM4-80GB", 312 * _T, 80 * _G, 300 * _G, 25 * _G, 2.04 * _T),
}


def get_device(name: str) -> DeviceSpec:
    key = name.lower()
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}: use a preset ({', '.join(DEVICES)}) or --profile")
    return DEVICES[key]


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """``nodes`` x ``per_node`` devices; ``tp`` tensor-parallel degree (inside a node,
    dividing heads and weights), the rest split between CP and data parallelism."""

    nodes: int
    per_node: int
    tp: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.per_node < 1 or self.tp < 1:
            raise ValueError(f"nodes, devices per node and tp must be >= 1, got "
                             f"{self.nodes}, {self.per_node}, {self.tp}")
        if self.per_node % self.tp:
            raise ValueError(f"tp={self.tp} must divide the devices per node ({self.per_node})")

    @property
    def world(self) -> int:
        return self.nodes * self.per_node
