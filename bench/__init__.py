"""Benchmark suite: `python -m bench [--quick] [--only NAME...]`.

Figure groups, one module each: peak (GEMM ceiling), train (training step vs diffusers), sample (DDIM-50 and
DPM-Solver++-20 vs diffusers), reader (shard reader vs training consumption), system (2 Ray workers vs one
process, peak RSS, latent vs pixel), e2e (no-op `dvc repro`; the full default repro: `python -m bench.e2e`),
inception (the FID Inception-v3's images per second: what fid_inception costs each stage), backbones
(train_diffusion's U-Net against its DiT at equal FLOPs on the default latents, with the bf16 peak in the same run).
Quality against diffusers at equal wall-clock: `python -m bench.quality --run DIR` (slow, separate).
diffusers is imported here only.
"""

GROUPS = ("peak", "train", "sample", "reader", "system", "e2e", "inception", "backbones")
