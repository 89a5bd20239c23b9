"""Exact EDT in JAX against scipy.ndimage.distance_transform_edt, indices (tie-breaking) included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from idgbr_jax.metrics import distance


def _random_maps(rng, shape, count):
  """Maps rich in equidistant ties: sparse points, lattices, rings, random noise."""
  h, w = shape
  maps = []
  for i in range(count):
    kind = i % 4
    if kind == 0:
      x = rng.random((h, w)) > rng.choice([0.002, 0.02, 0.1, 0.5])
    elif kind == 1:
      x = np.ones((h, w), bool)
      s = int(rng.integers(2, 9))
      x[rng.integers(s)::s, rng.integers(s)::s] = False
    elif kind == 2:
      x = np.ones((h, w), bool)
      for _ in range(int(rng.integers(1, 6))):
        x[rng.integers(h), rng.integers(w)] = False
    else:
      yy, xx = np.mgrid[:h, :w]
      r = min(h, w) / 3
      x = np.abs(np.hypot(yy - h / 2, xx - w / 2) - r) >= 0.7
    if x.all():
      x[0, 0] = False
    maps.append(x)
  return np.stack(maps)


@pytest.mark.parametrize("shape", [(23, 31), (64, 9), (48, 48)])
def test_edt_matches_scipy_including_indices(shape):
  rng = np.random.default_rng(sum(shape))
  maps = _random_maps(rng, shape, 48)
  dist, idx = jax.jit(lambda m: distance.distance_transform_edt(m, return_indices=True))(maps)
  dist, idx = np.asarray(dist), np.moveaxis(np.asarray(idx), 1, 0)
  for i, m in enumerate(maps):
    ref_d, ref_i = ndimage.distance_transform_edt(m, return_indices=True)
    np.testing.assert_allclose(dist[i], ref_d, rtol=1e-6)
    np.testing.assert_array_equal(idx[:, i], ref_i)


def test_ties_go_to_smallest_column_then_row():
  # (1, 1) is at distance 1 from (0, 1), (1, 0), (1, 2), (2, 1): scipy picks column 0.
  seeds = np.zeros((3, 3), bool)
  seeds[0, 1] = seeds[1, 0] = seeds[1, 2] = seeds[2, 1] = True
  d2, rows, cols = distance.feature_transform(seeds)
  assert (int(d2[1, 1]), int(rows[1, 1]), int(cols[1, 1])) == (1, 1, 0)
  # Same column above and below: the upper one (smaller row) wins.
  seeds = np.zeros((5, 1), bool)
  seeds[0, 0] = seeds[4, 0] = True
  d2, rows, cols = distance.feature_transform(seeds)
  assert (int(d2[2, 0]), int(rows[2, 0])) == (4, 0)


def test_no_seed_map_is_flagged():
  d2, rows, cols = distance.feature_transform(_one_seed_batch())
  assert np.all(np.asarray(d2[0]) == -1) and np.all(np.asarray(rows[0]) == -1)
  assert int(d2[1, 0, 0]) == 2 * 2 + 3 * 3 and int(cols[1, 0, 0]) == 3


def _one_seed_batch():
  seeds = np.zeros((2, 4, 5), bool)
  seeds[1, 2, 3] = True
  return jnp.asarray(seeds)


def _check_nearest_seed_bit(seeds, bit, needed, exact_sq, window):
  d2, got_bit = jax.jit(
      lambda s, b, n: distance.nearest_seed_bit(s, b, n, exact_sq, window))(seeds, bit, needed)
  d2, got_bit = np.asarray(d2), np.asarray(got_bit)
  ref_d2, rows, cols = (np.asarray(a) for a in distance.feature_transform(seeds))
  for i in range(len(seeds)):
    if not seeds[i].any():
      assert np.all(d2[i] == -1) and not got_bit[i].any()
      continue
    ref_bit = bit[i][rows[i], cols[i]]
    np.testing.assert_array_equal(d2[i][needed[i]], ref_d2[i][needed[i]])
    near = ref_d2[i] <= exact_sq
    np.testing.assert_array_equal(d2[i][near], ref_d2[i][near])
    np.testing.assert_array_equal(got_bit[i][near], ref_bit[near])
    # Elsewhere: an upper bound, never below the true distance.
    assert np.all(d2[i] >= ref_d2[i])


def test_nearest_seed_bit_window_path_matches_feature_transform():
  # Dense seeds: every pixel is within 3 of a seed, so the 8-pixel window settles all of them
  # (ties everywhere on the lattices).
  rng = np.random.default_rng(7)
  maps = [rng.random((29, 41)) < 0.5 for _ in range(6)]
  for s in (2, 3, 4):
    m = np.zeros((29, 41), bool)
    m[rng.integers(s)::s, rng.integers(s)::s] = True
    maps.append(m)
  seeds = np.stack(maps)
  bit = rng.random(seeds.shape) < 0.5
  needed = ~seeds
  _check_nearest_seed_bit(seeds, bit, needed, 18, 8)


@pytest.mark.parametrize("window", [0, 4])
def test_nearest_seed_bit_far_pixels_take_the_full_transform(window):
  # Sparse seeds, rings and empty maps: needed pixels lie far outside any window.
  rng = np.random.default_rng(window + 1)
  seeds = ~_random_maps(rng, (37, 45), 24)
  seeds[3] = False  # a map without any seed
  bit = rng.random(seeds.shape) < 0.5
  needed = rng.random(seeds.shape) < 0.2
  _check_nearest_seed_bit(seeds, bit, needed, 18, window)


@pytest.mark.parametrize("radius", [4, 5, 8])
def test_window_keys_settled_pixels_are_the_full_transform(radius):
  # The fast path alone (no lax.cond fallback behind it): every pixel it calls settled
  # (d2 < (radius + 1)^2) has the full transform's distance and nearest-seed bit. radius 4 is the
  # boundary case: 25 = 3^2 + 4^2 is reachable but must not count as settled.
  rng = np.random.default_rng(radius)
  seeds = ~_random_maps(rng, (33, 47), 16)
  bit = rng.random(seeds.shape) < 0.5
  key_dtype, inf = distance._key_layout(33, 47, 1)
  scale = 47 * 2
  best = np.asarray(distance._window_keys(jnp.asarray(seeds), jnp.asarray(bit), radius, scale,
                                          key_dtype, inf))
  d2, settled_bit = best // scale, (best & 1).astype(bool)
  settled = best < (radius + 1) ** 2 * scale
  ref_d2, rows, cols = (np.asarray(a) for a in distance.feature_transform(seeds))
  ref_bit = np.take_along_axis(bit.reshape(16, -1), (rows * 47 + cols).reshape(16, -1),
                               axis=1).reshape(seeds.shape)
  has = seeds.any(axis=(1, 2))[:, None, None] & np.ones_like(seeds)
  assert settled[has].mean() > 0.3  # a real share of pixels takes the fast path
  np.testing.assert_array_equal(d2[settled & has], ref_d2[settled & has])
  np.testing.assert_array_equal(settled_bit[settled & has], ref_bit[settled & has])
  # And nothing within reach is left unsettled.
  assert not np.any(has & ~settled & (ref_d2 < (radius + 1) ** 2))


def test_nearest_seed_bit_large_window_on_a_tiny_map():
  # A window or exact_sq beyond the map is clamped to it (it used to overflow the int32 keys).
  seeds = np.zeros((2, 4, 4), bool)
  seeds[0, 1, 2] = True
  seeds[1, 3, 0] = seeds[1, 0, 3] = True
  bit = np.zeros_like(seeds)
  bit[1, 3, 0] = True
  needed = np.ones_like(seeds)
  for window, exact_sq in ((13, 18), (0, 400), (40, 400)):
    _check_nearest_seed_bit(seeds, bit, needed, exact_sq, window)


def test_capped_distance_is_exact_below_the_cap():
  # The int16 transform of the far fallback: exact squared distances at the needed pixels that
  # lie less than _CAP away, and at least _CAP^2 at those that do not (maps wider than the cap).
  rng = np.random.default_rng(11)
  cap = distance._CAP
  seeds = np.zeros((4, 150, 2 * cap + 30), bool)
  seeds[0, rng.integers(150, size=6), rng.integers(seeds.shape[2], size=6)] = True
  seeds[1, 75, 10] = True  # one seed: the far right is beyond the cap
  seeds[2] = rng.random(seeds.shape[1:]) < 0.01
  seeds[3, :, cap + 15] = True  # a vertical line: both sides at distance up to cap + 15
  needed = rng.random(seeds.shape) < 0.3
  got = np.asarray(jax.jit(distance._capped_distance_sq)(seeds, needed, needed.any()))
  for i in range(len(seeds)):
    ref = np.rint(ndimage.distance_transform_edt(~seeds[i]) ** 2).astype(np.int64)
    near = needed[i] & (ref < cap * cap)
    far = needed[i] & ~near
    np.testing.assert_array_equal(got[i][near], ref[near])
    assert np.all(got[i][far] >= cap * cap)
    assert far.any() == (i in (1, 3))


def test_nearest_seed_bit_needed_pixels_beyond_the_cap_take_the_full_transform():
  # Needed pixels past _CAP: the capped transform hands over to the keyed full transform; pixels
  # within reach keep the window's bit. Map 0 stays below the cap, map 1 does not.
  rng = np.random.default_rng(12)
  cap = distance._CAP
  seeds = np.zeros((2, 40, 2 * cap + 20), bool)
  seeds[0, :, ::60] = rng.random((40, seeds[0, :, ::60].shape[1])) < 0.5
  seeds[1, 5:9, 3:7] = True
  seeds[1, 30, 12] = True
  bit = rng.random(seeds.shape) < 0.5
  needed = rng.random(seeds.shape) < 0.1
  _check_nearest_seed_bit(seeds[:1], bit[:1], needed[:1], 18, 8)
  _check_nearest_seed_bit(seeds, bit, needed, 18, 8)
