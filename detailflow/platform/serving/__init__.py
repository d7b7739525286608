"""Ray Serve generation endpoint: FastAPI ingress (app.py) -> Generator replicas (generator.py).

    detailflow serve up --config configs/serve-local.yaml     # deploy.py; serve status | down
    serve deploy configs/serve-gpu.yaml                        # same config, Ray's own CLI / RayService
"""
