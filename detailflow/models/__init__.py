"""Pure PyTorch + einops implementation of DetailFlow (no ray, mlflow, deepspeed, boto3, pyarrow)."""
