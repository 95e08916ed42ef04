"""DeRTa data: files -> official `{prefix, text, safe}` records -> tokenised examples -> batches.

    from derta_jax.data import pipeline, loader
    examples, stats = pipeline.training_examples(tokenizer, recipe="derta", safety=..., helpful=...,
                                                 max_length=seq_len, template="base", cut="word",
                                                 eos_text="<|end_of_text|>", rto_count=...,
                                                 prefix_count=...)
    plan = loader.make_plan(examples, batch_size, seq_len, seed, epochs=2)  # examples per step
    it = loader.make_loader(examples, plan, seed)                        # get_state/set_state

Modules: records (sources: JSON lines or `datasets`, flat or multi-turn rows, validated), sources
(TFDS builders), templates, recipe (the official rules), refusal, tokenize (masks, BOS,
truncation), packing, loader (grain), pipeline (one call), inspect (`python -m
derta_jax.data.inspect`), build (`python -m derta_jax.data.build`), demo/ (demo data and its
generator).
"""
