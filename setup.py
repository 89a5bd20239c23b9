"""Which packages the distribution installs, under which names (the rest is in setup.cfg).

The TFDS builders live in the top-level folder `datasets/` and the experiment configs in
`configs/`, but they install as `idgbr_datasets` and `idgbr_configs`: a top-level `datasets`
package would shadow Hugging Face `datasets` in the same environment (and `configs` is as
generic). Neither folder has an `__init__.py`, so from the repository root (the current directory
comes first on sys.path under `python -m pytest`) they are only namespace-package candidates,
which a regular package of that name later on sys.path wins over. setup.cfg cannot combine
`packages = find:` with a renaming `package_dir`, hence this file.
"""
from setuptools import find_packages, setup

RENAMED = {"idgbr_datasets": "datasets", "idgbr_configs": "configs"}


def _packages():
  packages = find_packages(include=["idgbr_jax", "idgbr_jax.*"])
  for name, folder in RENAMED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
  return packages


setup(packages=_packages(), package_dir=RENAMED)
