"""One request as the load generator saw it: the unit every statistic and plot is built from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

NO_RESPONSE = 0  # status of a request that got no HTTP answer (refused, reset, timed out)


@dataclass(frozen=True, slots=True)
class Record:
    """Times are seconds on the client's monotonic clock, relative to the run's first start."""

    start_s: float
    end_s: float
    status: int  # HTTP status, or NO_RESPONSE
    node: str | None = None  # the worker that answered (ringserve only; peers do not say)
    batch_size: int | None = None  # rows in the forward pass that served this request
    cached: bool | None = None
    error: str | None = None  # why a request failed, when it did
    key: int | None = None  # index of the routing key (its name: bench.keys.KeySpace.name(key))

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def latency_ms(self) -> float:
        return (self.end_s - self.start_s) * 1000

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Record:
        return cls(**raw)

    def shifted(self, origin_s: float) -> Record:
        """The same record with times measured from ``origin_s``."""
        return Record(
            self.start_s - origin_s,
            self.end_s - origin_s,
            self.status,
            self.node,
            self.batch_size,
            self.cached,
            self.error,
            self.key,
        )
