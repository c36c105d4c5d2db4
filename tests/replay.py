"""A resumable stream over a fixed list of batches, standing in for the grain iterator in training tests."""


def replay(batches):
  """(endless stream, get_state, set_state): the state is a JSON-able position, like grain's iterator state."""
  position = {"i": 0}

  def stream():
    while True:
      position["i"] += 1
      yield batches[(position["i"] - 1) % len(batches)]

  def restore(state):
    position["i"] = state["i"]

  return stream(), lambda: dict(position), restore
