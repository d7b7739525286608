"""MLflow "models from code" file for a consolidated export (model.safetensors + config.json).

MLflow stores THIS FILE with the model and executes it at load time, so the logged model holds
no pickle (DESIGN.md: what goes to the registry is safetensors + config.json). tracking.py logs it:

    tracker.log_export(export_dir, export_config, uri="s3://.../export", step=1000)

and a registry (or a user) loads it from the run's logged model:

    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    codes = model.predict(images_uint8_B3RR)          # tokenizer export: images -> codes (B x N)
    codes = model.predict(np.array([1, 2, 3]), params={"cfg_scale": 1.5, "seed": 0})   # AR: labels -> codes

The artefact "export" is the export folder with its weights as a link to S3 (tracking_links.py);
config.json's "kind" says which model to build.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class ExportModel(PythonModel):
    """Tokenizer: uint8 images B x 3 x R x R -> codes B x N. AR: class ids B -> sampled codes B x N."""

    def load_context(self, context):
        from detailflow.models.export import load_state_checked, read_config
        from detailflow.platform.tracking_links import resolve_links

        directory = resolve_links(context.artifacts["export"])  # the weights are linked, on S3
        self.config = read_config(directory)
        kind = self.config.get("kind")
        if kind == "tokenizer":
            from detailflow.platform.checkpoints import load_inference_tokenizer

            self.model = load_inference_tokenizer(directory, self.config)
        elif kind == "ar":
            from detailflow.models.ar import DetailFlowGPT
            from detailflow.models.configs import ARConfig

            self.model = DetailFlowGPT(ARConfig(**self.config["ar"]))
            load_state_checked(self.model, directory)
        else:
            raise ValueError(f"{directory}: export kind {kind!r} is not 'tokenizer' or 'ar'")
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        if isinstance(model_input, dict):  # a named tensor signature arrives as {name: array}
            (model_input,) = model_input.values()
        x = torch.as_tensor(np.asarray(model_input))
        with torch.no_grad():
            if self.config["kind"] == "tokenizer":
                return self.model.encode(x).cpu().numpy().astype(np.int64)
            from detailflow.models.sampler import sample

            params = params or {}
            gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
            codes = sample(self.model, x.long(), cfg_scale=float(params.get("cfg_scale", 1.5)), generator=gen)
            return codes.cpu().numpy().astype(np.int64)


def export_signature(export_config: dict):
    """Tokenizer: uint8 images (-1, 3, R, R) -> int64 codes (-1, N). AR: int64 class ids (-1,) ->
    int64 codes (-1, N), with params cfg_scale and seed."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    if export_config.get("kind") == "tokenizer":
        tok = export_config["tokenizer"]
        r, n = tok["image_size"], tok["num_tokens"]
        return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, r, r), "images")]),
                              outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, n), "codes")]))
    ar = export_config["ar"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1,), "class_ids")]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, ar["num_tokens"]), "codes")]),
        params=ParamSchema([ParamSpec("cfg_scale", "double", 1.5), ParamSpec("seed", "long", 0)]))


def export_requirements(names: tuple[str, ...] = ("torch", "safetensors", "einops", "numpy")) -> list[str]:
    """`names` pinned to what is installed here; given explicitly so MLflow does not load the model in
    a subprocess to infer them. torch without its local "+cpu" label (measured-here §5)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in names]


mlflow.models.set_model(ExportModel())
