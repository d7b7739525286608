"""Data plane: synthetic/IDX import, ingest to Parquet shards on S3, streaming reader with degradation,
code datasets for the AR stage, and the `detailflow data` CLI group."""
