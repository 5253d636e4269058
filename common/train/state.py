"""The train state and the default update: what every method's step reads and writes."""

from __future__ import annotations

from typing import Any

import flax
import jax
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator.

  ``step`` [] int32 counts the updates applied; ``rng`` [2] uint32 is the run's base key (each
  step folds in its step number, so randomness does not depend on where a run was resumed).
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """``ema <- decay * ema + (1 - decay) * params``, leaf by leaf."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def default_train_step(method, tx, lr_schedule, ema_decay: float):
  """(state, batch) -> (state, metrics): one update of every parameter the method owns."""

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_of(params):
      return method.loss_fn(params, batch, rng, state.step)

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, ema_decay)
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "lr": lr_schedule(state.step),
      **aux,
    }
    new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
    )
    return new_state, metrics

  return train_step
