"""Body models behind one interface (SMPL via smplx, Anny) and rotation conversions."""
