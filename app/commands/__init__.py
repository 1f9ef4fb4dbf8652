"""The stage commands of the `caft` CLI, one module per stage package. Each command builds its config and calls
one library function; heavy packages are imported inside the command bodies so `caft --help` stays fast."""
