"""Training toolkit: degradation pipelines, data, metrics and the trainer."""
