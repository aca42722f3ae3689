"""Packaging beyond what pyproject.toml can say: the top-level ``regressors/`` folder (the
known-regressor registry, one TOML per regressor) ships inside the package as
``jregfix.registry``, so editable and wheel installs read the same single copy.

pyproject's ``packages.find`` cannot add a package that lives outside ``jregfix/``, hence this
file (everything else, metadata included, stays in pyproject.toml).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["jregfix", "jregfix.*"]), "jregfix.registry"],
    package_dir={"jregfix.registry": "regressors"},
    package_data={"jregfix.registry": ["*.toml"]},
)
