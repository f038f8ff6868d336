"""`ditforge bench`: measured numbers, written as one JSON file plus a readable table.

Each section module has `run(quick: bool) -> list[dict]`; every dict is one configuration with
at least `name` and `device`. Ratios are always measured side by side in the same process run,
because these machines are noisy.
"""
