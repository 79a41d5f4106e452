"""Helpers shared by the training tests (importable as ``_testutil``: pytest puts tests/ on sys.path)."""
import jax
import numpy as np


def override(config, overrides: dict):
    """Set dotted keys of an ml_collections config in place (``{"train.num_steps": 4}``) and return it.

    A string value starting with "(" is a tuple written as a CLI flag value ("(1,2)") and is evaluated,
    so one dict serves both the Python configs and ``--config.KEY=VALUE`` flags."""
    for k, v in overrides.items():
        node = config
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = eval(v) if isinstance(v, str) and v.startswith("(") else v
    return config


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)
