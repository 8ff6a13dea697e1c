"""Which teachers each rank holds (one teacher per rank group, Algorithm 1).

Rule: with W ranks and N teachers,
- W a multiple of N: rank r holds teacher r mod N; all of its samples carry that style. Data-
  parallel gradient averaging then weighs every teacher equally (W / N ranks each).
- N a multiple of W: rank r holds teachers r, r + W, ...; its batch is split evenly among them.
- otherwise the layout is refused before any model is loaded.
One process (W = 1) holds every teacher and splits each batch among them.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class TeacherLayout:
    world_size: int
    num_teachers: int

    def __post_init__(self):
        w, n = self.world_size, self.num_teachers
        if w < 1 or n < 1:
            raise LayoutError(f"need at least one rank and one teacher, got world size {w} and {n} teachers")
        if w % n and n % w:
            raise LayoutError(
                f"cannot give {n} teachers equal weight on {w} ranks: the world size must be a multiple of the "
                f"teacher count (e.g. {n * max(1, w // n)} or {n * (w // n + 1)} ranks) or divide it "
                f"(e.g. {max(d for d in range(1, n + 1) if n % d == 0 and d <= w)} ranks)"
            )

    def teachers_for_rank(self, rank: int) -> list[int]:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} outside world size {self.world_size}")
        if self.world_size % self.num_teachers == 0:
            return [rank % self.num_teachers]
        return list(range(rank, self.num_teachers, self.world_size))

    def styles_for_batch(self, rank: int, batch_size: int) -> list[int]:
        """The style index of every sample of this rank's batch (round-robin over its teachers)."""
        local = self.teachers_for_rank(rank)
        if batch_size % len(local):
            raise LayoutError(
                f"rank {rank} holds {len(local)} teachers; data.batch_size ({batch_size}) must be a multiple of it "
                "so that every teacher gets the same number of samples"
            )
        return [local[j % len(local)] for j in range(batch_size)]
