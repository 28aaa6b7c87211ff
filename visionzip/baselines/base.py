"""What every comparison method's config shares: how it is written into ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class BaselineConfig:
    """Base of the methods' frozen dataclass configs: ``name`` is the method's entry-point name."""

    name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """``{"method": name, **options}`` as ``config.json`` keeps it (tuples as lists)."""
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"method": self.name, **options}
