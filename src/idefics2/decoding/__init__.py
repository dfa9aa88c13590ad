"""The decode core that `generate` and the serving engine (`batch`, `serve`, `eval`) share.

Modules, in the order data flows: kv_rows.py (the KV cache, one row per sequence), graphs.py (CUDA graphs of
the decode step), runner.py (the model calls: image features, prefill, decode steps; a pool of runners for
`generate` on CUDA) and sampler.py (the one logits chain: every row's controls and the token picks). It uses
only the model's public pieces (embed_inputs, get_image_features, the decoder, lm_head, decode_logits,
new_kv_cache) and imports nothing of the model's own code.
"""
