"""Measured quality with nothing downloaded: generated-set quality (class accuracy, Fréchet
distance) and each video task against its no-model baseline."""
