"""DeRTa data: files -> official `{prefix, text, safe}` records -> tokenised examples -> batches.

    from derta_jax.data import pipeline, loader
    examples, stats = pipeline.training_examples(tokenizer, recipe="derta", safety=..., helpful=...,
                                                 max_length=seq_len, template="base", cut="word",
                                                 eos_text="<|end_of_text|>", rto_count=...,
                                                 prefix_count=...)
    plan = loader.make_plan(examples, batch_size, seq_len, seed, epochs=2)  # examples per step
    it = loader.make_loader(examples, plan, seed)                        # get_state/set_state

Modules: records (JSON-lines validation), sources (TFDS builders), templates, recipe (the official
rules), refusal, tokenize (masks, BOS, truncation), packing, loader (grain), pipeline (one call),
build (`python -m derta_jax.data.build`), demo/ (demo data and its generator).
"""
