"""32 seeds × 2 learning rates of a small NNX model on in-memory arrays, and their barriers with intervals over seeds."""
import numpy as np
from flax import nnx

import jaxlmc


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(20, 64, rngs=rngs)
        self.out = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


rng = np.random.default_rng(0)
x = rng.normal(size=(3000, 20)).astype(np.float32)
y = (x[:, :4] @ rng.normal(size=(4, 4))).argmax(1)  # four classes, from a random linear map
spec = [[jaxlmc.UnitAxis("hidden", "kernel", 1), jaxlmc.UnitAxis("hidden", "bias", 0),
         jaxlmc.UnitAxis("out", "kernel", 0)]]  # the hidden units, for weight matching

members = jaxlmc.fit(Net, (x[:2000], y[:2000]), lr=[1e-3, 1e-2], seeds=32, steps=500, batch_size=64,
                     permutation_spec=spec)
result = jaxlmc.pair_barriers(members, {"test": (x[2000:], y[2000:])}, align="weights")
print(jaxlmc.format_table(result.summary(), ["lr", "pairs", "error_barrier_test_mean", "error_barrier_test_ci_lo",
                                             "error_barrier_test_ci_hi", "error_barrier_test_aligned_mean", "verdict"]))
