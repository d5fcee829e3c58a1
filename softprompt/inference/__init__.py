"""Generation: the per-adapter prompt cache, the mixed-adapter decode engine, sampling, detokenisation, and the
`generate` / chat functions built on them."""
