"""Mesh construction from configs: sizes, -1, the device order, multi-slice validation."""
import ml_collections
import numpy as np
import pytest

import jax
from idgbr_jax.parallel import sharding


def test_sizes_and_fill():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  small = sharding.make_mesh({"data": 2})  # an explicit smaller mesh takes the first devices
  assert [d.id for d in small.devices.flat] == [0, 1]


@pytest.mark.parametrize("shape,dcn,match", [
    ({"data": 3, "fsdp": 3}, None, "needs 9 devices"),
    ({"data": -1, "fsdp": 3}, None, "does not divide 8"),
    ({"data": -1, "fsdp": -1}, None, "at most one -1"),
    ({"batch": 2}, None, "unknown axes"),
    ({"data": -1}, {"data": 3}, "does not divide 8 devices"),
    ({"data": 2}, {"data": 2}, "must use all 4 devices"),
    ({"data": -1}, {"data": 0}, ">= 1"),
])
def test_bad_shapes_name_the_problem(shape, dcn, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(shape, dcn_shape=dcn)


def test_one_process_has_no_second_granule():
  # Multi-slice needs as many granules as the DCN shape asks for (see test_multihost.py for 2).
  with pytest.raises(ValueError, match="slices|granule|processes"):
    sharding.make_mesh({"data": -1}, dcn_shape={"data": 2})


def test_mesh_from_config_reads_the_dcn_shape():
  cfg = ml_collections.ConfigDict({"mesh_shape": {"data": -1, "fsdp": 4, "tensor": 1},
                                   "dcn_mesh_shape": {"data": 1, "fsdp": 1, "tensor": 1}})
  assert dict(sharding.mesh_from_config(cfg).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  del cfg["dcn_mesh_shape"]  # older configs without it
  assert dict(sharding.mesh_from_config(cfg).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert jax.device_count() == 8 and np.asarray(sharding.mesh_from_config(cfg).devices).size == 8
