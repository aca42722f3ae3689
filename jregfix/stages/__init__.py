"""Pipeline stages: each a plain function (inputs, config) -> output files + manifest."""
