"""Logging for the commands that do no training: DeepSpeed's accelerator probe kept off their output."""

from __future__ import annotations

import logging

DEEPSPEED_LOGGER = "DeepSpeed"  # the logger deepspeed.utils.logging creates (it writes to stdout)
PROBE_MESSAGE = "Setting accelerator to CPU"  # DeepSpeed's import-time probe on a machine without a GPU


class _DropProbe(logging.Filter):
    """Passes every DeepSpeed record but the accelerator probe's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(PROBE_MESSAGE)


def quiet_deepspeed_probe() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" warning in this process (idempotent; other records pass).

    Our commands that do no training (``llava.convert``, ``llava.tiny``) never import DeepSpeed, but transformers'
    ``save_pretrained`` does when it is installed: ``unwrap_model`` -> accelerate's ``extract_model_from_parallel``
    -> ``from deepspeed import DeepSpeedEngine``, and DeepSpeed's import probes for an accelerator and prints that
    line to stdout on a CPU machine. The filter sits on DeepSpeed's logger, which keeps it when DeepSpeed configures
    the logger at import.
    """
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DropProbe) for f in logger.filters):
        logger.addFilter(_DropProbe())
