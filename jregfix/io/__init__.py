"""File formats: every read and write of the outside world goes through this layer."""
