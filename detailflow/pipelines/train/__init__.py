"""Training stages: tokenizer, AR, code extraction, the shared loop, stage configs, exports."""
