"""Shared fixtures: the embedded SmolLM2 folder, a tiny local Llama, and one SmolLM2 server."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from helpers.server import Server  # noqa: E402
from helpers.tiny_model import build_llama  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    from sglang_fairkv import embedded_model

    return embedded_model.prepare()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """2 layers, 4 query / 2 KV heads (divisible by TP=2), head_dim 32."""
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def smollm2_server():
    """One default server (no --model-path: the embedded SmolLM2, CPU defaults)."""
    with Server([]) as server:
        yield server
