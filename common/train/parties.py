"""One function applied to K parties' stacked trees in a train step (collab's clients, hybrid's
users): how the K copies are laid out in the compiled step.

``loop`` (the methods' ``collab.client_loop`` / ``hybrid.user_loop``):

* ``vmap``: one batched computation. On accelerators the default: the K networks' convolutions
  become one grouped convolution, and the parties can be split over the mesh. On XLA:CPU a
  grouped convolution's weight gradient is ~40x slower than K plain ones.
* ``scan``: a loop over the parties, so the step's program holds the network's forward and
  backward once, whatever K: the XLA:CPU default. It traces its body ``in_loop_body()``, where
  the U-Net's convolutions spell their gradients in the form XLA:CPU's kernels run inside a loop
  (``common.models.conv``), and it
  picks each party's floating-point leaves by a one-hot product rather than the loop's slice,
  which XLA:CPU would fuse into every elementwise consumer (``common.models.stacked``).
* ``unroll``: the K computations written out one after another, with K copies of the network to
  compile (a collab digits step with five clients: 54 s of XLA compile against 29 s for
  ``scan``; hybrid's four users 30 against 15 s), and XLA:CPU free to run two parties' small ops
  side by side (collab digits' step 6-7% faster than ``scan``; hybrid's 4% slower).
  ``benchmarks/party_loops.py`` measures both. Under the tests' XLA settings ``scan`` gives
  ``unroll``'s bits (tested for both methods); under the binaries' (YNNPACK dots, LLVM -O2)
  hybrid's step still does and collab's moves in float rounding (3e-4 after 32 Adam steps), as
  fusion differs.

XLA's cost analysis counts a loop body once: ``map_parties(..., for_flops=True)`` writes the scan
out (``unroll=True``, each party taken by its index) for the lowered-only FLOP-counting step
(``Method.make_flops_counting_step``), whose count then equals ``unroll``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from common.models import conv as conv_lib
from common.models import stacked as stacked_lib

PARTY_LOOPS = ("vmap", "scan", "unroll")


def map_parties(
  fn: Callable[..., Any],
  per_party: tuple,
  shared: tuple = (),
  *,
  loop: str,
  for_flops: bool = False,
) -> Any:
  """``fn(*party_k_args, *shared)`` for each party k, outputs stacked on a new leading axis.

  Args:
    fn: one party's computation, e.g. its loss's ``value_and_grad``.
    per_party: trees whose leaves all have the parties on their leading axis ``[K, ...]``.
    shared: arguments every party gets whole.
    loop: ``vmap`` | ``scan`` | ``unroll`` (module docstring).
    for_flops: write a ``scan`` out, for a step that is only lowered to count its FLOPs.

  Returns:
    ``fn``'s output tree with every leaf ``[K, ...]``.
  """
  if loop not in PARTY_LOOPS:
    raise ValueError(f"party loop {loop!r}; allowed: {', '.join(PARTY_LOOPS)}")
  k_count = jax.tree.leaves(per_party)[0].shape[0]
  if loop == "vmap":
    in_axes = (0,) * len(per_party) + (None,) * len(shared)
    return jax.vmap(fn, in_axes=in_axes)(*per_party, *shared)
  if loop == "unroll":
    outs = [fn(*jax.tree.map(lambda a, k=k: a[k], per_party), *shared) for k in range(k_count)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  if for_flops:
    # Written out, each party taken by its index: the picking products below are XLA:CPU's
    # layout, not the method's arithmetic, and would add 2 K FLOPs a parameter to the count.
    def indexed(carry, k):
      return carry, fn(*jax.tree.map(lambda a: a[k], per_party), *shared)

    return jax.lax.scan(indexed, None, jnp.arange(k_count), unroll=True)[1]

  def body(carry, onehot):
    with conv_lib.in_loop_body():
      return carry, fn(*stacked_lib.pick(per_party, onehot), *shared)

  return jax.lax.scan(body, None, jnp.eye(k_count, dtype=jnp.float32))[1]
