"""jregfix: refine SMPL fits and re-fit the Human3.6M joint regressor (Hedlin et al., CRV 2022)."""

__version__ = "0.1.0"
