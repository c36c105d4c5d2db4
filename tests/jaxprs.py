"""What a traced program does, for tests that pin down which operations a fast path avoids."""

from __future__ import annotations

import jax
import jax.extend


def scatters(closed_jaxpr) -> list[tuple[str, jax.core.ShapedArray]]:
  """(primitive name, operand's abstract value) of every scatter in the program, nested programs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if "scatter" in eqn.primitive.name:
        found.append((eqn.primitive.name, eqn.invars[0].aval))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(closed_jaxpr.jaxpr)
  return found


def arrays_made(closed_jaxpr, outside: str) -> list[tuple[str, jax.core.ShapedArray]]:
  """(primitive name, result's abstract value) of every result in the program, nested programs included but those
  of primitive `outside` (e.g. "shard_map": what the program makes outside its per-device parts)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.extend((eqn.primitive.name, var.aval) for var in eqn.outvars)
      if eqn.primitive.name != outside:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          walk(sub)

  walk(closed_jaxpr.jaxpr)
  return found
