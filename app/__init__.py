"""The roof: the `caft` command line, the run config, the stage pipeline, the demo and the data generators.

This is the only package that imports every other one; nothing imports it back (an import contract in CI
keeps it so)."""
