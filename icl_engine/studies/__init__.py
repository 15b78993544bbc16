"""Studies layer: the approximation report (compare), the sample-size bounds and their experiments."""
