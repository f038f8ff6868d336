"""Runs: the run folder and its protocol (layout, naming, resume, stop, finalize), and following a
submitted job. Used by the CLI, the driver and the workers; it imports neither the CLI nor a cluster."""
