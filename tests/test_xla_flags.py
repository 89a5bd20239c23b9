"""The project's default XLA flags: added unless the user set them, and accepted by XLA."""

import os
import subprocess
import sys

from idgbr_jax import xla_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_apply_defaults_adds_once_and_respects_the_user():
  env = {}
  assert xla_flags.apply_defaults(env) == "--xla_cpu_experimental_ynn_fusion_type="
  assert xla_flags.apply_defaults(env) == env["XLA_FLAGS"] == (
      "--xla_cpu_experimental_ynn_fusion_type=")  # not added twice
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_flags.apply_defaults(env).split() == [
      "--xla_force_host_platform_device_count=2", "--xla_cpu_experimental_ynn_fusion_type="]
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert xla_flags.apply_defaults(env) == "--xla_cpu_experimental_ynn_fusion_type=dot"
  env = {"IDGBR_XLA_DEFAULTS": "0"}
  assert xla_flags.apply_defaults(env) == "" and "XLA_FLAGS" not in env
  assert "LIBTPU_INIT_ARGS" not in env


def test_tpu_defaults_go_to_libtpu_and_respect_the_user():
  env = {}
  xla_flags.apply_defaults(env)
  assert env["LIBTPU_INIT_ARGS"].split() == [
      "--xla_tpu_enable_windowed_einsum_for_all_gather=false",
      "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"]
  assert "windowed" not in env["XLA_FLAGS"]  # XLA_FLAGS would reject a libtpu flag
  xla_flags.apply_defaults(env)
  assert len(env["LIBTPU_INIT_ARGS"].split()) == 2  # not added twice
  # The user's own setting of one flag wins; the other default is still added.
  env = {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_windowed_einsum_for_all_gather=true --foo=1"}
  xla_flags.apply_defaults(env)
  assert env["LIBTPU_INIT_ARGS"].split() == [
      "--xla_tpu_enable_windowed_einsum_for_all_gather=true", "--foo=1",
      "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"]


def test_xla_accepts_the_flags_and_computes_the_same():
  # An unknown XLA flag aborts the process: run one convolution under the flags in a fresh one.
  code = ("import jax, jax.numpy as jnp, numpy as np;"
          "x = jnp.asarray(np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3) / 100);"
          "w = jnp.ones((3, 3, 3, 4), jnp.float32) / 27;"
          "y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
          "dimension_numbers=('NHWC', 'HWIO', 'NHWC'));"
          "print(float(y.sum()))")
  results = []
  for defaults in ("1", "0"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", IDGBR_XLA_DEFAULTS=defaults, PYTHONPATH=_ROOT)
    env.pop("XLA_FLAGS", None)
    script = f"from idgbr_jax import xla_flags; xla_flags.apply_defaults(); {code}"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    results.append(float(out.stdout.strip().splitlines()[-1]))
  assert abs(results[0] - results[1]) < 1e-4 * abs(results[1])


def test_cpu_device_flags_for_evaluation():
  assert xla_flags.cpu_device_flags(3) == ("--xla_force_host_platform_device_count=3",)
  cores = xla_flags.usable_cores()
  assert 1 <= cores <= (os.cpu_count() or 1)
  assert xla_flags.cpu_device_flags() == (f"--xla_force_host_platform_device_count={cores}",)
  env = {}
  assert xla_flags.apply_defaults(env, extra=xla_flags.cpu_device_flags(4)).split() == [
      "--xla_cpu_experimental_ynn_fusion_type=", "--xla_force_host_platform_device_count=4"]
  # The user's device count wins.
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert "count=4" not in xla_flags.apply_defaults(env, extra=xla_flags.cpu_device_flags(4))
