"""The trained model on disk: ``ctxpar train --out DIR`` writes it, ``ctxpar generate
--model DIR`` reads it.

``DIR`` holds a Hugging Face checkpoint (``save_pretrained``: ``config.json``,
``model.safetensors``, ``generation_config.json``) and ``ctxpar_task.json``, the recall
task it was trained on (sequence length, keys, values, the run's seed) and how (method,
layout, steps, dtype), so that held-out prompts of the same task can be built from it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

__all__ = ["TASK_FILE", "save_trained", "load_trained", "quiet_transformers"]

TASK_FILE = "ctxpar_task.json"


def quiet_transformers() -> None:
    """No progress bars or info lines from transformers' save/load."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def save_trained(model: torch.nn.Module, out_dir: str, info: dict[str, Any]) -> list[str]:
    """Save ``model`` (``save_pretrained``) and ``info`` (the task) into ``out_dir``;
    returns the paths written. The attention implementation is not saved: the loader
    chooses its own."""
    quiet_transformers()
    model.save_pretrained(out_dir)
    path = os.path.join(out_dir, TASK_FILE)
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    return [os.path.join(out_dir, "config.json"), os.path.join(out_dir, "model.safetensors"), path]


def load_trained(model_dir: str, attn: str, device: torch.device):
    """``(model, info)``: the checkpoint in ``model_dir`` with attention ``attn``, in eval
    mode on ``device``, and its ``ctxpar_task.json`` (``{}`` if absent)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    path = os.path.join(model_dir, TASK_FILE)
    info = {}
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    return model.to(device).eval(), info
