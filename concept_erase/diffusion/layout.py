"""Where a training run's bytes live, per process, under each memory setting (for `plan.py`).

The settings that change bytes per UNet entry rather than activations: the trained weights' dtype
(`--master-weights`: fp32, or bf16 with fp32 copies of the salient entries only, or bf16 alone with stochastic
rounding), gradient release (`--grad-release`: each parameter is stepped in its post-accumulate-grad hook, so at
most the largest parameter's gradient is resident), the engine the accelerate launch config selects (FSDP's
FULL_SHARD and DeepSpeed ZeRO-3 divide weights, gradients and optimizer state over the processes, ZeRO-2 the
gradients and optimizer state) and ZeRO's CPU offload of the optimizer state. The salient set is a packed bitmask
(1 bit per entry of a partially salient parameter; the int32 index of every salient entry it replaced was 32x
that at keep 1). Where a setting cannot apply is the loop's rule (`TrainConfig.check_launch`), which `plan`
mirrors; the engines' launch configs are `configs/accelerate/` (README, "Sharding and offload").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# bitsandbytes' 8-bit Adam: two uint8 states, a float32 absmax per 256-entry block for each; tensors under
# 4096 entries keep 32-bit states (its min_8bit_size).
BNB_BLOCK, BNB_MIN_SIZE = 256, 4096
WEIGHT_BYTES = {"fp32": 4, "salient-fp32": 2, "bf16-stochastic": 2}


@dataclass(frozen=True)
class Layout:
    """Per process: bytes per trained entry and what is divided over how many processes."""

    weight_bytes: int       # bytes per entry of the trained module's weights (and so of its gradients)
    salient_master: bool    # an fp32 copy of each salient entry beside the bf16 weights (salient-fp32)
    release: bool           # gradient release: no full gradient is ever resident
    weight_shards: int      # processes the weights are divided over (fsdp, zero3)
    state_shards: int       # processes the gradients, optimizer state and bitmask are divided over
    offload: bool           # the optimizer state lives in host memory (ZeRO's CPU offload)

    @classmethod
    def of(cls, config) -> "Layout":
        master = config.master_weights
        n = config.num_processes if config.sharding != "none" else 1
        return cls(WEIGHT_BYTES[master], master == "salient-fp32", config.grad_release,
                   n if config.sharding in ("fsdp", "zero3") else 1, n, config.offload_optimizer)

    @property
    def half_weights(self) -> bool:
        return self.weight_bytes == 2

    def weights(self, numel: int) -> int:
        return math.ceil(self.weight_bytes * numel / self.weight_shards)

    def sharded(self, nbytes: int) -> int:
        """A gradient's, the optimizer state's or the bitmask's bytes on one process."""
        return math.ceil(nbytes / self.state_shards)


def bitmask_bytes(numels: list[int]) -> int:
    """The packed salient set: one bit per entry of each partially salient parameter, in whole bytes."""
    return sum(math.ceil(n / 8) for n in numels)


def optimizer_state(numels: list[int], kind: str) -> int:
    """Adam's two states for tensors of these sizes: fp32 (8 bytes an entry), or bitsandbytes' 8-bit ones."""
    if kind == "adam8bit":
        return sum(2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) if n >= BNB_MIN_SIZE else 8 * n for n in numels)
    return sum(8 * n for n in numels)
