"""The MLflow runs of a training run name (the tag the trainers set), for the training tests."""

from __future__ import annotations


def runs_named(tracking_uri: str, experiment: str, run_name: str):
    """(client, [runs tagged with run_name in experiment])."""
    from mlflow.tracking import MlflowClient

    from detailflow.platform.tracking import RUN_NAME_TAG

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    return client, runs
