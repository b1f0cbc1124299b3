"""Where the frozen base weights live between uses."""

from __future__ import annotations

import enum

from lema.errors import ConfigError


class MemoryStrategy(str, enum.Enum):
    """The guide's memory strategies, plus AUTO.

    * ``STREAMING``: weights stay in the mmap'd file; each layer is read and uploaded per
      pass (lowest host RAM and device memory).
    * ``RESIDENT``: all weights are loaded into host RAM once and uploaded per layer per pass.
    * ``AUTO``: as many layers as the device budget allows stay on the device for the
      whole run; only the rest are streamed.
    """

    STREAMING = "streaming"
    RESIDENT = "resident"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: "str | MemoryStrategy") -> "MemoryStrategy":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ConfigError(f"strategy: {value!r} is not a memory strategy; use one of {choices}") from None
