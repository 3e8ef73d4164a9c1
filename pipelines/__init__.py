"""One pipeline per corpus: read -> stages -> decisions -> hand kept rows to the shard writer."""
