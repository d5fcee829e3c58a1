"""Records and how they become token ids; nothing here runs a model.

- `records`: read JSON / JSONL / CSV / Parquet / save_to_disk data, map fields, validate every record;
- `templates`: how a record becomes prompt text and answer text (one implementation for every verb);
- `batching`: tokenised examples, length-grouped steps, token-budget micro-batches, padding.
"""
