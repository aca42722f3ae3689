"""The synthetic world behind `jregfix demo`, kept apart from the real pipeline.

A Human3.6M-like world where the truth is known: Anny bodies in motion (:mod:`.motion`), seen by
a Human3.6M-like camera rig (:mod:`.rig`), with method error models (:mod:`.noise`), written in
the real pipeline's file formats (:mod:`.world`), and the demo's configurations (:mod:`.demo`).
:mod:`.body` is a stand-in SMPL-format body (the real SMPL files are licensed) for tests and
benchmarks. Only this package, ``jregfix.cli.demo``, tests and benchmarks import it: the real
pipeline never depends on synthetic data.
"""
