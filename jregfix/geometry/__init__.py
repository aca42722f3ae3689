"""Cameras, projection, Procrustes alignment and pose metrics."""
