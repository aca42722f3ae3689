"""The known-regressor registry: one TOML file per regressor, ``<name>.toml``.

Installed as the package data of ``jregfix.registry`` (read by
:func:`jregfix.io.regressors.load_registry`). Keys of each file:

- ``name``: the registry name (equal to the file stem), as in ``jregfix regressors download NAME``;
- ``description``: what the regressor is;
- ``shape``: ``[K, V]``, joints x body-model vertices;
- ``url``: where the raw file is downloaded from, pinned to a commit; ``""`` when there is no
  public single-file download;
- ``sha256``: the raw file's hash (64 hex digits), checked on every download; ``""`` exactly when
  ``url`` is;
- ``licence``: what the licence allows (nothing we may not redistribute is committed here: only
  where to get the weights and their hash);
- ``transform``: what to apply to the raw file before ``joints = J @ vertices``:
  ``"relu-row-normalise"`` (ReLU, then each row divided by its sum) or ``"none"``;
- optional ``training_subjects`` (Human3.6M subjects it was fitted on) and ``training_note``.
"""
