"""Installing the project does not shadow other packages: the TFDS builders in `datasets/` install
as `idgbr_datasets` and the configs in `configs/` as `idgbr_configs` (see setup.py), so a user's
Hugging Face `datasets` (or any `datasets` / `configs`) stays importable, also from the
repository root, where `python -m pytest` puts the current directory first on sys.path."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERIC = ("datasets", "configs")


def _python(code, cwd, env_extra=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("PYTHONPATH", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_a_regular_datasets_package_after_the_repo_root_wins(tmp_path):
  # A stand-in for Hugging Face `datasets` (and a `configs`) in a site directory that comes after
  # the repository root on sys.path, as site-packages does.
  site = tmp_path / "site"
  for name in GENERIC:
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("FAKE = True\n")
  out = _python(f"""
      import sys
      assert sys.path[0] == "", sys.path[:2]  # the repository root (cwd) first, as under pytest
      import datasets, configs
      assert getattr(datasets, "FAKE", False), datasets
      assert getattr(configs, "FAKE", False), configs
      import idgbr_datasets.synthetic_rs
      from idgbr_datasets import _common
      from idgbr_configs import stage1_synthetic, stage2_synthetic
      assert idgbr_datasets.synthetic_rs.__file__.startswith({REPO!r})
      assert stage2_synthetic.get_config("runlocal").data.name == "synthetic_rs"
      ours = sorted(m for m in sys.modules if m.split(".")[0] in {GENERIC!r} and "." in m)
      assert not ours, ours  # nothing of ours was imported under the generic names
      print("ok")
      """, cwd=REPO, env_extra={"PYTHONPATH": str(site)})
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_installed_distribution_names_no_generic_top_level_package(tmp_path):
  # Every copy of the metadata on sys.path: the installed .dist-info in site-packages and, from
  # the repository root, the .egg-info that the editable install leaves there.
  dists = list(importlib.metadata.distributions(name="idgbr-jax"))
  assert any(d.read_text("INSTALLER") for d in dists), "idgbr-jax is not installed"
  for dist in dists:
    top_level = set((dist.read_text("top_level.txt") or "").split())
    assert {"idgbr_jax", "idgbr_datasets", "idgbr_configs"} <= top_level, top_level
    assert not top_level & set(GENERIC), top_level
    # An editable install maps names to folders (setuptools' finder) or adds folders to sys.path
    # (.pth lines): neither may expose the repository root or a generic name.
    for f in dist.files or ():
      if f.name.endswith(".pth"):
        for line in f.read_text().splitlines():
          if line and not line.startswith(("import ", "#")):
            assert os.path.realpath(line) != os.path.realpath(REPO), (f, line)
      if f.name.startswith("__editable__") and f.name.endswith("_finder.py"):
        namespace = {}
        exec(compile(f.read_text(), str(f), "exec"), namespace)  # noqa: S102 - our own finder
        mapped = set(namespace.get("MAPPING", {})) | set(namespace.get("NAMESPACES", {}))
        assert not mapped & set(GENERIC), mapped
        assert "idgbr_datasets" in mapped, mapped
  # ... and from anywhere else, the installed names import and the generic ones are not ours.
  out = _python(f"""
      import importlib.util
      import idgbr_datasets.synthetic_rs, idgbr_configs.demo
      for name in {GENERIC!r}:
        spec = importlib.util.find_spec(name)
        places = [] if spec is None else [spec.origin or "",
                                          *(spec.submodule_search_locations or [])]
        assert not any(str(p).startswith({REPO!r}) for p in places), (name, places)
      print("ok")
      """, cwd=str(tmp_path))
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
