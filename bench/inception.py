"""What the FID Inception-v3 costs here: images per second through the project's extractor (torch-fidelity's
TF-exact resize to 299x299 and the network), on 1 and 2 threads, as the stages build it (batch norms folded into
the convolutions, channels_last), without the folding, and in torch's default layout, and the share of the resize.
`python -m bench --only inception`.

The stage budgets follow from these: reference_stats, evaluate and every sweep trial with fid_inception pay
N / (images per second) for N images.
"""

from __future__ import annotations

import time

import torch

from .common import interleaved, load, num_threads


def run(quick: bool = False) -> dict:
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    from torch_fidelity.utils import create_feature_extractor

    from diffusion_core.metrics.fidelity import FID_INCEPTION_EXTRACTOR, extract_features, inception_extractor

    batch = 32 if quick else 64
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 1, 28, 28, generator=g) * 255).to(torch.uint8)  # mnist5k's size, grey -> RGB
    t0 = time.perf_counter()
    fast = inception_extractor()  # batch norms folded, channels_last on the CPU: as the stages build it
    load_s = time.perf_counter() - t0
    plain = inception_extractor().to(memory_format=torch.contiguous_format)
    unfolded = create_feature_extractor(FID_INCEPTION_EXTRACTOR, ["2048"], cuda=False, verbose=False).to(
        memory_format=torch.channels_last)
    out = {"batch": batch, "image": "1x28x28 uint8 (repeated to RGB)", "extractor_load_s": round(load_s, 2),
           "load_before": load()}
    for threads in (1, 2):
        with num_threads(threads):
            t = interleaved({
                "channels_last": lambda: extract_features(images, fast, batch_size=batch),
                "contiguous": lambda: extract_features(images, plain, batch_size=batch),
                "unfolded": lambda: extract_features(images, unfolded, batch_size=batch),
                "resize_only": lambda: interpolate_bilinear_2d_like_tensorflow1x(
                    images.expand(-1, 3, -1, -1).float(), size=(299, 299), align_corners=False),
            }, repeats=1 if quick else 3)
        out[f"threads_{threads}"] = {k: {"images_per_s": round(batch / v["median_s"], 2), **v} for k, v in t.items()}
        out[f"threads_{threads}"]["folding_speedup"] = round(
            t["unfolded"]["median_s"] / t["channels_last"]["median_s"], 3)
        out[f"threads_{threads}"]["resize_fraction"] = round(
            t["resize_only"]["median_s"] / t["channels_last"]["median_s"], 3)
    out["images_per_s_2threads"] = out["threads_2"]["channels_last"]["images_per_s"]
    out["seconds_per_1000_images_2threads"] = round(1000 / out["images_per_s_2threads"], 1)
    out["load_after"] = load()
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
