"""Fixtures for the ModelProxy tests: a tiny local model built once per test session.

Everything is real except ``FakeServerManager`` in ``test_backends.py`` (verl's
rollout servers need GPUs): the tokenizer and Qwen2 model come from
``prepare.tiny_model``, the server is uvicorn on 127.0.0.1, the clients are the
``openai`` SDK, ``litellm`` and mini-swe-agent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# litellm must not fetch its model cost map from the network (no network here);
# mini-swe-agent must not write to the user's config dir or print a banner on import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
os.environ.setdefault("MSWEA_CONFIGURED", "true")
os.environ.setdefault("MSWEA_COST_TRACKING", "ignore_errors")
os.environ.setdefault("MSWEA_GLOBAL_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "model-proxy-tests-mswea"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prepare.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def token_builder(tokenizer):
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    return create_continuous_token_builder(tokenizer, hf_model_type="qwen2")


@pytest.fixture(scope="session")
def hf_backend(tiny_model_dir: Path):
    from model_proxy.backends.hf_local import HFLocalBackend

    backend = HFLocalBackend(tiny_model_dir, seed=0, num_threads=1)
    yield backend
    backend.close()


@pytest.fixture
async def proxy():
    from model_proxy.server import ModelProxyServer

    server = await ModelProxyServer.start(host="127.0.0.1", port=0)
    yield server
    await server.stop()
