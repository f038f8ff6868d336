"""A trained model at work: sampling (during training and `ditforge sample`), consolidated weights
out of a checkpoint (`ditforge export`, a diffusers folder) and the MLflow pyfunc model."""
