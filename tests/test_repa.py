"""REPA pieces: torch-exact resampling, teacher input size, token alignment, loss, projector."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from idgbr_jax.models import repa


def test_teacher_input_size():
  assert repa.teacher_input_size((512, 512), 14) == (448, 448)
  assert repa.teacher_input_size((256, 384), 14) == (224, 336)
  assert repa.teacher_input_size((20, 14), 14) == (14, 14)
  with pytest.raises(ValueError, match="smaller than the teacher patch size"):
    repa.teacher_input_size((10, 64), 14)


def test_resize_matrix_rows_sum_to_one_and_identity():
  for mode in ("bilinear", "bicubic"):
    for n_in, n_out in ((8, 32), (37, 32), (5, 3)):
      m = repa.torch_resize_matrix(n_in, n_out, mode)
      np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(repa.torch_resize_matrix(7, 7, mode), np.eye(7))


def test_repa_loss_values():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(2, 5, 4)).astype(np.float32)
  t = rng.normal(size=(2, 5, 4)).astype(np.float32)
  s[0, 1] = 0.0  # an inert (zero) student token is left out of the mean
  loss = float(repa.repa_loss(jnp.asarray(s), jnp.asarray(t)))
  cos = (s * t).sum(-1) / np.maximum(np.linalg.norm(s, axis=-1), 1e-6) / np.linalg.norm(t, axis=-1)
  valid = np.linalg.norm(s, axis=-1) > 1e-6
  np.testing.assert_allclose(loss, -cos[valid].mean(), rtol=1e-6)
  assert float(repa.repa_loss(jnp.asarray(t), jnp.asarray(t))) == pytest.approx(-1.0, abs=1e-6)
  assert float(repa.repa_loss(jnp.zeros_like(t), jnp.asarray(t))) == 0.0
  # bf16 inputs are compared in float32.
  assert repa.repa_loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)).dtype == (
      jnp.float32)


def test_projector_shapes_count_and_init():
  proj = repa.Projector()
  boxed = jax.eval_shape(proj.init, jax.random.PRNGKey(0), jnp.zeros((1, 1280)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(boxed)))
  assert n == 9_967_104  # 1280*2048+2048 + 2048*2048+2048 + 2048*1536+1536
  small = repa.Projector(hidden_dim=64, out_dim=48)
  params = nn.unbox(small.init(jax.random.PRNGKey(0), jnp.zeros((1, 32))))["params"]
  assert np.all(np.asarray(params["fc1"]["bias"]) == 0)
  bound = math.sqrt(6 / (64 + 64))
  w = np.asarray(params["fc2"]["kernel"])
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound  # xavier uniform
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 32))
  y = small.apply({"params": params}, x)
  p = jax.tree.map(np.asarray, params)
  silu = lambda v: v / (1 + np.exp(-v))
  h = silu(np.asarray(x) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  h = silu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
  np.testing.assert_allclose(np.asarray(y), h @ p["fc3"]["kernel"] + p["fc3"]["bias"], rtol=1e-4,
                             atol=1e-5)


@pytest.mark.torch
def test_interpolate_matches_torch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 9, 7)).astype(np.float32)  # NCHW for torch
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  cases = [("bicubic", dict(size=(23, 5))), ("bicubic", dict(size=(4, 16))),
           ("bilinear", dict(size=(32, 29))), ("bilinear", dict(size=(3, 4))),
           ("bicubic", dict(scale_factor=(32.1 / 9, 20.1 / 7)))]
  for mode, kw in cases:
    ref = F.interpolate(torch.from_numpy(x), mode=mode, align_corners=False, **kw).numpy()
    got = np.asarray(repa.torch_interpolate(xj, mode=mode, **kw)).transpose(0, 3, 1, 2)
    assert got.shape == ref.shape, (mode, kw)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{mode} {kw}")


@pytest.mark.torch
def test_teacher_input_and_align_tokens_match_torch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(1)
  img = rng.normal(size=(1, 3, 64, 48)).astype(np.float32)
  got = np.asarray(repa.teacher_input(jnp.asarray(img.transpose(0, 2, 3, 1)), 14))
  size = repa.teacher_input_size((64, 48), 14)
  assert size == (56, 42)
  ref = F.interpolate(torch.from_numpy(img), size=size, mode="bicubic", align_corners=False,
                      antialias=False).numpy()
  np.testing.assert_allclose(got.transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)

  student = rng.normal(size=(2, 8, 8, 6)).astype(np.float32)
  tokens = np.asarray(repa.align_tokens(jnp.asarray(student), (32, 32)))
  ref = F.interpolate(torch.from_numpy(student.transpose(0, 3, 1, 2)), size=(32, 32),
                      mode="bilinear", align_corners=False)
  ref = ref.flatten(2).permute(0, 2, 1).numpy()
  np.testing.assert_allclose(tokens, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.torch
def test_repa_loss_matches_original_torch_code():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(2)
  out = rng.normal(size=(2, 16, 8)).astype(np.float32)
  tilde = rng.normal(size=(2, 16, 8)).astype(np.float32)
  tilde[1, 3:7] = 0.0
  # The original's loss (tools/train.py), written out here.
  o = F.normalize(torch.from_numpy(out), dim=-1, eps=1e-6)
  t = torch.from_numpy(tilde)
  n = t.norm(dim=-1, keepdim=True)
  valid = n.squeeze(-1) > 1e-6
  t = t / n.clamp_min(1e-6)
  ref = (-(o * t).sum(-1))[valid].mean().item()
  got = float(repa.repa_loss(jnp.asarray(tilde), jnp.asarray(out)))
  assert got == pytest.approx(ref, rel=1e-5)


def test_repa_loss_gradient_is_finite_for_a_zero_student():
  # A code-mode CG net starts with an exactly-zero residual, so the projected student is 0:
  # those tokens are masked out and must contribute zero (not NaN) gradient, as in torch.
  teacher = jax.random.normal(jax.random.key(0), (2, 4, 8))
  student = jnp.zeros((2, 4, 8)).at[0, 0].set(1.0)
  grad = jax.grad(lambda s: repa.repa_loss(s, teacher))(student)
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)
  assert np.abs(np.asarray(grad)[0, 0]).sum() > 0
  assert float(jax.grad(lambda s: repa.repa_loss(s, teacher))(jnp.zeros((2, 4, 8))).sum()) == 0.0
