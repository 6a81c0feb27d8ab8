"""What is told about a model: the machine, speed and memory benchmarks, the headline
metrics, the size/quality points, provenance, the model card and publishing."""
