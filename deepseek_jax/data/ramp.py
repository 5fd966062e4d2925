"""V3's batch-size ramp as a plan of steps (V3 report Sec. 4.2: 3072 -> 15360 sequences over the
first 469B tokens), and the batcher that makes the data pipeline follow it.

batch(t) = start + inc * floor((end - start) * min(t, R) / (R inc)), t = tokens of the steps
before, so each step's size is fixed before it runs and a restored iterator replays it.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING, NamedTuple

import grain
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from deepseek_jax.data.pipeline import DataConfig


class BatchPlan(NamedTuple):
    """Where each batch size of the ramp starts: parallel tuples, one entry per size."""

    start_steps: tuple[int, ...]  # first step using the size
    batch_sizes: tuple[int, ...]  # global batch (sequences)
    start_tokens: tuple[int, ...]  # tokens seen before that first step
    seq_len: int

    def batch_at(self, step: int) -> int:
        """Global batch size of `step` (0-based)."""
        return self.batch_sizes[bisect.bisect_right(self.start_steps, step) - 1]

    def tokens_before(self, step: int) -> int:
        """Tokens of steps [0, step)."""
        k = bisect.bisect_right(self.start_steps, step) - 1
        return (
            self.start_tokens[k] + (step - self.start_steps[k]) * self.batch_sizes[k] * self.seq_len
        )

    def tokens_before_jnp(self, step):
        """`tokens_before` of a traced step (float32, for schedules inside jit)."""
        s = jnp.asarray(step, jnp.float32)
        starts = jnp.asarray(self.start_steps, jnp.float32)
        k = jnp.clip(jnp.searchsorted(starts, s, side="right") - 1, 0, len(self.start_steps) - 1)
        per_step = jnp.asarray(self.batch_sizes, jnp.float32)[k] * self.seq_len
        return jnp.asarray(self.start_tokens, jnp.float32)[k] + (s - starts[k]) * per_step

    def step_at(self, tokens: float) -> int:
        """The first step that starts with at least `tokens` tokens seen."""
        k = bisect.bisect_right(self.start_tokens, tokens) - 1
        per_step = self.batch_sizes[k] * self.seq_len
        return self.start_steps[k] + max(0, math.ceil((tokens - self.start_tokens[k]) / per_step))


def batch_plan(data: DataConfig) -> BatchPlan:
    """The ramp of `data` (a single size when `data.batch_ramp_start` is None)."""
    end, T = data.global_batch_size, data.seq_len
    if data.batch_ramp_start is None:
        return BatchPlan((0,), (end,), (0,), T)
    start, inc, R = data.batch_ramp_start, data.batch_ramp_increment, data.batch_ramp_tokens
    n = (end - start) // inc  # sizes after the first
    steps, sizes, seen_at = [0], [start], [0]
    step, seen = 0, 0
    for k in range(1, n + 1):
        t_k = R * k * inc / (end - start)  # the ramp reaches start + k inc at t_k tokens
        b = sizes[-1]
        m = max(0, math.ceil((t_k - seen) / (b * T)))
        step, seen = step + m, seen + m * b * T
        steps.append(step)
        sizes.append(start + k * inc)
        seen_at.append(seen)
    return BatchPlan(tuple(steps), tuple(sizes), tuple(seen_at), T)


class RampBatch(grain.IterDataset):
    """Batches rows with the size of each step of `plan` (divided over `process_count` hosts)."""

    def __init__(self, parent: grain.IterDataset, plan: BatchPlan, process_count: int, pad):
        super().__init__(parent)
        self._plan, self._hosts, self._pad = plan, process_count, pad

    def __iter__(self):
        return _RampBatchIterator(self._parent.__iter__(), self._plan, self._hosts, self._pad)


class _RampBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, plan: BatchPlan, hosts: int, pad):
        super().__init__(parent)
        self._plan, self._hosts, self._pad, self._step = plan, hosts, pad, 0

    def __next__(self):
        n = self._plan.batch_at(self._step) // self._hosts  # this host's rows
        rows = []
        for _ in range(n):
            try:
                rows.append(next(self._parent))
            except StopIteration:
                break
        if not rows:
            raise StopIteration
        self._step += 1
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # [b, T]
        return self._pad(batch, batch_size=n)

    def get_state(self):
        return {"parent": self._parent.get_state(), "step": self._step}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._step = state["step"]
