"""The tuners of this package. Each is a PeftConfig + BaseTuner + BaseTunerLayer; they never import each other."""
