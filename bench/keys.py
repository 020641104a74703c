"""Routing keys for generated load: uniform over a key space, or Zipf-skewed for hot keys."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KEY_SPACE = 10_000
KEY_PREFIX = "user-"


@dataclass(frozen=True)
class KeySpace:
    """``size`` keys ``user-0 .. user-<size-1>``; ``zipf`` = s > 0 draws key rank k with weight 1/k^s.

    Zipf is over the finite key space (numpy's own ``zipf`` is unbounded), so s may be below 1;
    rank 1 (``user-0``) is the hottest key.
    """

    size: int = KEY_SPACE
    zipf: float | None = None
    ordered: bool = False  # request n (of one client process) sends key n mod size: a scripted sequence

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"the key space needs at least one key, got {self.size}")
        if self.zipf is not None and not self.zipf > 0:
            raise ValueError(f"the Zipf exponent must be > 0, got {self.zipf}")
        if self.zipf is not None and self.ordered:
            raise ValueError("keys are drawn Zipf-distributed or sent in order, not both")

    def probabilities(self) -> np.ndarray:
        """P(key i) for i in 0..size-1."""
        if self.zipf is None:
            return np.full(self.size, 1 / self.size)
        weights = np.arange(1, self.size + 1, dtype=np.float64) ** -self.zipf
        return weights / weights.sum()

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` key indexes drawn independently (the same for the same seed)."""
        if self.ordered:
            return np.arange(n) % self.size
        rng = np.random.default_rng(seed)
        if self.zipf is None:
            return rng.integers(0, self.size, n)
        return rng.choice(self.size, size=n, p=self.probabilities())

    @staticmethod
    def name(index: int) -> str:
        return f"{KEY_PREFIX}{index}"

    def describe(self) -> str:
        order = "in order" if self.ordered else "uniform" if self.zipf is None else f"Zipf s={self.zipf:g}"
        return f"{self.size:,} keys, {order}"
