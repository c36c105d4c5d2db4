"""What a traced program does, for tests that pin down which operations a fast path avoids."""

from __future__ import annotations

from typing import Iterator

import jax
import jax.extend


def equations(closed_jaxpr, outside: str | None = None) -> Iterator:
  """Every equation of the program, nested programs included but those of primitive `outside` (e.g. "shard_map":
  what the program does outside its per-device parts)."""

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      if eqn.primitive.name != outside:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          yield from walk(sub)

  return walk(closed_jaxpr.jaxpr)


def scatters(closed_jaxpr) -> list[tuple[str, jax.core.ShapedArray]]:
  """(primitive name, operand's abstract value) of every scatter in the program, nested programs included."""
  return [(eqn.primitive.name, eqn.invars[0].aval) for eqn in equations(closed_jaxpr)
          if "scatter" in eqn.primitive.name]


def arrays_made(closed_jaxpr, outside: str) -> list[tuple[str, jax.core.ShapedArray]]:
  """(primitive name, result's abstract value) of every result in the program outside primitive `outside`'s
  nested programs."""
  return [(eqn.primitive.name, var.aval) for eqn in equations(closed_jaxpr, outside) for var in eqn.outvars]
