"""Which teacher supervises each rank's samples (one teacher per rank group, Algorithm 1).

Rule, with W ranks, N teachers and A gradient-accumulation micro-steps per optimizer step
(W * A "slots" per step):
- N divides W * A (rotation): slot (rank r, micro-step m) is supervised by teacher
  (m * W + r) mod N, and all of that micro-batch's samples carry its style. Each teacher gets
  exactly W * A / N slots per optimizer step, so gradient averaging weighs every teacher
  equally. With W a multiple of N this is the paper's layout (rank r always holds teacher
  r mod N, one teacher per rank); otherwise a rank holds the teachers it rotates through
  (N / gcd(W, N) of them), each loaded only there.
- otherwise, N a multiple of W (batch split): rank r holds teachers r, r + W, ... and splits
  every micro-batch evenly among them (one process holds every teacher this way).
- otherwise the layout is refused before any model is loaded; the message names the
  smallest grad-accumulation count and the nearest world sizes that would work.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class TeacherLayout:
    world_size: int
    num_teachers: int
    accum_steps: int = 1

    def __post_init__(self):
        w, n, a = self.world_size, self.num_teachers, self.accum_steps
        if w < 1 or n < 1 or a < 1:
            raise LayoutError(f"need at least one rank, one teacher and one micro-step, got world size {w}, "
                              f"{n} teachers, grad_accum_steps {a}")
        if (w * a) % n and n % w:
            need = n // gcd(w, n)
            raise LayoutError(
                f"cannot give {n} teachers equal weight on {w} ranks with distributed.grad_accum_steps={a}: "
                f"world size x grad_accum_steps must be a multiple of the teacher count (set "
                f"distributed.grad_accum_steps to a multiple of {need}, or use {n * max(1, w // n)} or "
                f"{n * (w // n + 1)} ranks), or the world size must divide it"
            )

    @property
    def rotates(self) -> bool:
        return (self.world_size * self.accum_steps) % self.num_teachers == 0

    def teacher_for_slot(self, rank: int, micro_step: int) -> int:
        return (micro_step * self.world_size + rank) % self.num_teachers

    def teachers_for_rank(self, rank: int) -> list[int]:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} outside world size {self.world_size}")
        if self.rotates:
            return sorted({self.teacher_for_slot(rank, m) for m in range(self.accum_steps)})
        return list(range(rank, self.num_teachers, self.world_size))

    def styles_for_batch(self, rank: int, batch_size: int, micro_step: int = 0) -> list[int]:
        """The style index of every sample of this rank's micro-batch."""
        if self.rotates:
            self.teachers_for_rank(rank)  # checks the rank
            return [self.teacher_for_slot(rank, micro_step % self.accum_steps)] * batch_size
        local = self.teachers_for_rank(rank)
        if batch_size % len(local):
            raise LayoutError(
                f"rank {rank} holds {len(local)} teachers; data.batch_size ({batch_size}) must be a multiple of it "
                "so that every teacher gets the same number of samples"
            )
        return [local[j % len(local)] for j in range(batch_size)]

    def describe(self) -> str:
        if self.rotates:
            return (f"{self.num_teachers} teachers on {self.world_size} ranks x {self.accum_steps} micro-steps: "
                    "slot (rank r, micro-step m) uses teacher (m*W + r) mod N")
        return f"{self.num_teachers} teachers on {self.world_size} ranks: each rank splits its batch among its teachers"
