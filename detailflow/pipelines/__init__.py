"""Pipeline stages: ingest, train-tokenizer, extract-codes, train-ar, evaluate, promote."""
