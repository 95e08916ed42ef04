"""DeRTa data: files -> official `{prefix, text, safe}` records -> tokenised examples -> batches.

    from derta_jax.data import pipeline, loader
    examples, stats = pipeline.training_examples(tokenizer, recipe="derta", safety=..., helpful=...,
                                                 max_length=seq_len, template="base", cut="word",
                                                 rto_count=..., prefix_count=...)
    it = loader.make_loader(examples, batch_size_per_host, seq_len, seed)   # get_state/set_state

Modules: records (JSON-lines validation), sources (TFDS builders), templates, recipe (the official
rules), refusal, tokenize (masks, BOS, truncation), packing, loader (grain), pipeline (one call),
build (`python -m derta_jax.data.build`), demo/ (demo data and its generator).
"""
