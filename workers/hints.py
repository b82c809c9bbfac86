"""What a request tells the MARS scheduler about its current segment.

Carried in `SamplingParams.extra_args["mars"]` of each input chunk, so it
reaches the scheduler with the chunk and needs no side channel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

EXTRA_ARGS_KEY = "mars"


@dataclass(frozen=True)
class SegmentHints:
    tool: str | None = None
    """Name of the API the segment ends with (keys the duration predictor)."""
    api_s: float | None = None
    """Expected API duration; a client hint, or the truth in oracle mode."""
    decode_tokens: int | None = None
    """Expected tokens before the API call (or the end)."""
    api_return_tokens: int | None = None
    """Expected tokens the API call appends."""
    final: bool = False
    """No API call follows this segment."""

    def __post_init__(self) -> None:
        for name in ("api_s", "decode_tokens", "api_return_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")

    def to_extra_args(self) -> dict[str, Any]:
        return {EXTRA_ARGS_KEY: {k: v for k, v in asdict(self).items() if v is not None}}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> SegmentHints:
        return cls(**((extra_args or {}).get(EXTRA_ARGS_KEY) or {}))
