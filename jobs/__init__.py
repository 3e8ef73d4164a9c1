"""Entry points: build_pretrain (spark-submit), make_sample (the bundled sample corpus)."""
