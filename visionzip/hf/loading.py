"""Loading transformers checkpoints quietly where we check the keys ourselves."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

LOAD_REPORT_LOGGER = "transformers.modeling_utils"


class _DropLoadReport(logging.Filter):
    """Drops transformers' per-key ``LOAD REPORT`` records; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Silence transformers' per-key load report while we check the keys ourselves (and raise on real problems).

    Only that report: a filter on its logger, removed on exit (also on error). The logger's level stays as it is,
    since transformers runs extra checks (and warns) when that level is raised.
    """
    report_logger = logging.getLogger(LOAD_REPORT_LOGGER)
    drop = _DropLoadReport()
    report_logger.addFilter(drop)
    try:
        yield
    finally:
        report_logger.removeFilter(drop)
