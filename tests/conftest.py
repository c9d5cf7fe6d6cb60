"""Shared test set-up: offline hub, one torch thread (2-core CI), tiny model families built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("EVOMERGE_THREADS", "1")  # runs started by the tests keep the suite's one thread

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """base + three fine-tune-like variants of a tiny random Llama, as HF folders."""
    from evomerge.models.tiny import make_family

    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory):
    """base + three variants of a tiny random Qwen2 (biases in q/k/v)."""
    from evomerge.models.tiny import make_family

    return make_family(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def smollm2_gguf():
    from evomerge.models.tiny import smollm2_gguf_path

    return smollm2_gguf_path()
