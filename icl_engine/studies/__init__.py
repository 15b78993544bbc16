"""Studies layer: the sample-size bounds and the experiments that check their shapes."""
