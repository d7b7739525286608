"""Adapters to real systems: settings, S3 storage, local services, Ray Train + DeepSpeed, MLflow, Serve."""
