"""Runs: the run folder and its protocol (`folder.py`), the final registration (`register.py`), the
Ray job's driver (`driver.py`) and following a submitted job (`follow.py`). The folder module
stands below the training code (the workers write into it); the others above it."""
