"""Evaluation: metric maths, the FID Inception feature network, tokenizer and generator evaluations.

API for callers (the registry / promotion gate, benchmarks, the CLI); every evaluation returns a
plain dict of metrics (floats) plus a few identifying strings:

    from detailflow.pipelines.evaluate.metrics import frechet_distance, kid, precision_recall, ...
    from detailflow.pipelines.evaluate.inception import InceptionConfig, InceptionFeatures
    from detailflow.pipelines.evaluate.tokenizer_eval import TokenizerEvalConfig, evaluate_tokenizer
    from detailflow.pipelines.evaluate.generator_eval import GeneratorEvalConfig, evaluate_generator
    res = evaluate_generator(GeneratorEvalConfig(ar="ar-tiny-...", dataset="shapes", n=1000), settings)
    res["fid"], res["kid"], res["precision"], res["recall"], res["mlflow_run_id"]

Each evaluation is its own MLflow run in experiment "detailflow-eval"; it is complete only when its
tag `eval.complete` is "true" (written last, after results.json): see evaluate/tracking.py.
"""
