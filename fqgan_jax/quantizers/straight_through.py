"""The straight-through estimator as a `jax.custom_vjp`: forward the code, backward the identity."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
    """Returns ``q``; in the backward pass the cotangent goes to ``z`` unchanged and ``q`` gets 0.

    Equivalent to ``z + stop_gradient(q - z)`` but without the rounding of the add/subtract, so the
    forward value is exactly ``q``. ``z`` and ``q`` must have the same shape.
    """
    _check_same_shape(z, q)
    return q


def _check_same_shape(z: jax.Array, q: jax.Array) -> None:
    if jnp.shape(z) != jnp.shape(q):
        raise ValueError(
            f"straight_through needs equal shapes; got {jnp.shape(z)} and {jnp.shape(q)}"
        )


def _straight_through_fwd(z, q):
    _check_same_shape(z, q)
    # A scalar residual carries z's dtype so the cotangent can be cast back to it.
    return q, jnp.zeros((), jnp.result_type(z))


def _straight_through_bwd(z_dtype_witness, output_cotangent):
    z_cotangent = output_cotangent.astype(z_dtype_witness.dtype)
    return z_cotangent, jnp.zeros_like(output_cotangent)


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)
