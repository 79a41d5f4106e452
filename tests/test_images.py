"""jaxdiff.images.to_uint8 against NumPy transcriptions of the two conventions it serves."""
import numpy as np
import pytest

from jaxdiff.images import to_uint8


def test_to_uint8_both_ranges_match_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([[-1.0, 1.0, 0.0, -0.5, 0.5, -1.3, 1.3], rng.uniform(-1.2, 1.2, 500)]).astype(np.float32)
    want = np.clip(np.round((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_uint8(x)), want)
    u = np.concatenate([[0.0, 1.0, 0.5, -0.1, 1.1], rng.uniform(-0.1, 1.1, 500)]).astype(np.float32)
    want = np.clip((u * 255).round(), 0, 255).astype(np.uint8)  # diffusers' numpy_to_pil, clipped
    np.testing.assert_array_equal(np.asarray(to_uint8(u, value_range=(0, 1))), want)
    assert np.asarray(to_uint8(np.float32([0.5]), value_range=(0, 1)))[0] == 128  # round half to even: 127.5 -> 128


def test_to_uint8_rejects_an_empty_range():
    with pytest.raises(ValueError, match="high > low"):
        to_uint8(np.zeros(2, np.float32), value_range=(1, 1))
