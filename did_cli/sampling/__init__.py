"""The DiD sampler: stage 1 drafts block by block with a KV cache, stage k > 1 remasks and revises.

Paper symbols: B1 = `draft_block_size` (DraftSettings.block_size), B2 = `refine_block_size`
(RefineSettings.block_size), γ = `gamma`. Snapshot confidence is the model's probability of a token at the call
that committed it; post-hoc confidence rescores the finished draft with one extra forward pass.
"""
