"""Loading a checkpoint says only what concerns the user: no list of "not sharded" layers, no per-key load report
(our checks raise on real problems), no torchvision fallback, no rope_scaling deprecation. The import-time warnings
need a fresh process: tests/test_hub_cache.py::test_a_fresh_process_reads_the_environment_and_loads_quietly."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import transformers
from transformers import CLIPImageProcessorPil

from llava.model.builder import load_pretrained_model
from llava.tiny import write_tiny_llava
from visionzip.hf.loading import LOAD_REPORT_LOGGER, quiet_load_report


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def transformers_records() -> Iterator[list[str]]:
    """Every message transformers' loggers emit at warning level while inside (its default verbosity)."""
    library = logging.getLogger("transformers")
    handler, verbosity = _Records(), transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    library.addHandler(handler)
    try:
        yield handler.messages
    finally:
        library.removeHandler(handler)
        transformers.utils.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quiet")
    return {"v15": write_tiny_llava(root), "v16": write_tiny_llava(root, next=True)}


def test_quiet_load_report_drops_the_report_only() -> None:
    report_logger = logging.getLogger(LOAD_REPORT_LOGGER)
    level = report_logger.level
    with transformers_records() as messages:
        with quiet_load_report():
            assert report_logger.level == level  # a raised level makes transformers list every unsharded layer
            report_logger.warning("LlavaLlamaForCausalLM LOAD REPORT from: ckpt\nmissing ...")
            report_logger.warning("something else")
        report_logger.warning("CLIPVisionModel LOAD REPORT from: clip")  # outside: reported again
    assert messages == ["something else", "CLIPVisionModel LOAD REPORT from: clip"]


@pytest.mark.parametrize("name", ["v15", "v16"])
def test_loading_logs_nothing_but_what_matters(ckpts: dict[str, Path], name: str) -> None:
    with transformers_records() as messages:
        processor = load_pretrained_model(str(ckpts[name]), device="cpu")[2]
    assert not [m for m in messages if "were not sharded" in m or "LOAD REPORT" in m or "torchvision" in m]
    assert type(processor) is CLIPImageProcessorPil  # LLaVA's PIL preprocessing, named without a fallback


def test_llava15_config_loads_without_the_rope_scaling_warning(ckpts: dict[str, Path]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained_model(str(ckpts["v15"]), device="cpu")
    assert not [w for w in caught if "rope_scaling" in str(w.message)]


def test_released_tokenizer_layout_loads_without_the_rope_scaling_warning(sp_llava15: Path) -> None:
    """The released LLaVA-1.5 files (tokenizer_config naming LlamaTokenizer, config.json with rope_scaling: null)."""
    assert "rope_scaling" in (sp_llava15 / "config.json").read_text()  # the legacy key is there to warn about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained_model(str(sp_llava15), device="cpu")
    assert not [w for w in caught if "rope_scaling" in str(w.message)]
