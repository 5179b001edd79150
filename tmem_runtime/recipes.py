"""Write recipes: optimizer, learning rate, epochs and batch size of one memory write.

"paper" is TMEM's (SGD, lr 5e-4, 5 epochs, batch 16), tuned for 4B models; on the 135M embedded
model it barely moves the loss. "default" (AdamW 3e-3, 15 epochs, batch 16) is the recipe chosen by
benchmarks/recall_study.py on the "tune" fact sets and reported on the "held-out" ones
(tmem_runtime/fact_sets.py; table in benchmarks/RESULTS.md): recall of made-up facts on SmolLM2-135M.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Recipe:
    """How one write trains: `epochs` passes over the examples in batches of `batch_size`.

    Divergence guard: a write whose loss at some step exceeds `divergence_factor` x its first step's
    loss + `divergence_margin` nats is rolled back whole, like a NaN (`divergence_factor=None` turns
    the guard off). The defaults leave ordinary writes alone (their losses fall) and catch a runaway
    learning rate within the write that caused it.
    """

    optimizer: str = "adamw"
    lr: float = 3e-3
    epochs: int = 15
    batch_size: int = 16
    weight_decay: float = 0.0
    max_length: int = 256
    divergence_factor: float | None = 2.0
    divergence_margin: float = 5.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        bad = [f"{name}={getattr(self, name)!r} (must be {rule})" for name, rule, ok in (
            ("lr", "> 0", self.lr > 0), ("epochs", ">= 1", self.epochs >= 1),
            ("batch_size", ">= 1", self.batch_size >= 1), ("max_length", ">= 2", self.max_length >= 2),
        ) if not ok]  # fmt: skip
        if bad:
            raise ValueError(f"invalid recipe: {', '.join(bad)}")
        if self.divergence_factor is not None and not (self.divergence_factor >= 1 and self.divergence_margin >= 0):
            raise ValueError(f"divergence_factor must be >= 1 (or None) and divergence_margin >= 0: {self}")

    def with_(self, **changes) -> Recipe:
        return replace(self, **changes)

    def diverged_at(self, losses: list[float]) -> int | None:
        """The first step (1-based) whose loss is past the divergence threshold, else None."""
        if self.divergence_factor is None or not losses:
            return None
        limit = self.divergence_factor * losses[0] + self.divergence_margin
        return next((k for k, v in enumerate(losses, start=1) if v > limit), None)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(optimizer="sgd", lr=5e-4, epochs=5, batch_size=16),
    "default": Recipe(optimizer="adamw", lr=3e-3, epochs=15, batch_size=16),
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A Recipe from its name ("paper", "default") or itself."""
    if isinstance(recipe, Recipe):
        return recipe
    try:
        return RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}") from None
