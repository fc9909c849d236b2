"""A²CR's attention term A(b): how much of its sequence's attention a block receives.

The worker measures (`Observation`: a block's share of one decode query's attention
mass); the device pool and the tier service fold the measurements into A with the same
estimator, so a block keeps its rank when it moves between them:

    A_obs = r / (1 + r),  r = mass * blocks_in_sequence     uniform attention → 0.5
    A    ← A + w_n · (A_obs - A),  w_n = max(0.1, 1 / (n + 2)) for the n-th observation

A starts at 0.5 (`UNIFORM_ATTENTION`) and stays in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

from wicore.kv.hashing import BlockHash

# A block never observed is assumed to get uniform attention: the neutral middle
# of A's range, so that it is neither protected nor sacrificed for lack of data.
UNIFORM_ATTENTION = 0.5
# A is a confidence-weighted mean: the prior counts as this many observations, so
# the n-th observation has weight 1 / (n + 2). One noisy observation moves A a third
# of the way (a block read once by a short request is not ranked on a single sample),
# twenty move it most of the way. A fixed EMA weight of 0.5 let one sample decide, and
# blocks read once (one-off prompts) outranked chat history that was certain to be reread.
ATTENTION_PRIOR_WEIGHT = 2.0
# Floor of an observation's weight: past 8 observations A is an EMA over about the last
# ten, so it still follows a block whose share changes (a chat turn sliding into history).
ATTENTION_ALPHA_MIN = 0.1


@dataclass(frozen=True, slots=True)
class Observation:
    """`mass` of a sequence's attention (one measurement) fell on this block."""

    block_hash: BlockHash
    mass: float
    blocks_in_sequence: int


def attention_from_mass(mass: float, blocks_in_sequence: int) -> float:
    """A = r / (1 + r) with r = mass * blocks_in_sequence.

    `mass` is the block's share of the attention mass of a sequence of
    `blocks_in_sequence` blocks; uniform attention (mass = 1/n) gives r = 1, A = 0.5;
    no attention gives 0; A tends to 1 as one block takes all the mass of a long sequence.
    """
    if blocks_in_sequence < 1:
        raise ValueError(f"blocks_in_sequence: must be >= 1, got {blocks_in_sequence}")
    if not 0.0 <= mass <= 1.0:
        raise ValueError(f"mass: must be in [0, 1], got {mass}")
    r = mass * blocks_in_sequence
    return r / (1.0 + r)


def attention_alpha(observations: int) -> float:
    """Weight of the `observations`-th sample (1-based) in A: max(0.1, 1 / (observations + 2)).

    A = (2 * 0.5 + sum of the samples) / (2 + n) for the first 8 samples: their mean,
    shrunk towards the uniform prior; from then on an EMA with weight 0.1.
    """
    if observations < 1:
        raise ValueError(f"observations: must be >= 1, got {observations}")
    return max(ATTENTION_ALPHA_MIN, 1.0 / (observations + ATTENTION_PRIOR_WEIGHT))


def fold_attention(attention: float, weight: float, mass: float, blocks_in_sequence: int) -> float:
    """A after one more observation with `weight` (`attention_alpha(n)` for the n-th): in [0, 1]."""
    observed = attention_from_mass(mass, blocks_in_sequence)
    return min(1.0, max(0.0, (1.0 - weight) * attention + weight * observed))
