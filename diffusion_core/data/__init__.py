"""Datasets (embedded and external sources) and WebDataset shard I/O."""

from .errors import DataError
from .prepare import prepare_dataset
from .reader import ShardDataset, dist_info, load_split
from .shards import (
    array_samples,
    build_meta,
    decode_npy,
    decode_png,
    encode_field,
    find_meta,
    read_meta,
    sha256_file,
    write_array_split,
    write_meta,
    write_shards,
)
from .sources import SourceData, load_source, stratified_split

__all__ = [
    "DataError",
    "SourceData",
    "ShardDataset",
    "array_samples",
    "build_meta",
    "decode_npy",
    "decode_png",
    "dist_info",
    "encode_field",
    "find_meta",
    "load_source",
    "load_split",
    "prepare_dataset",
    "read_meta",
    "sha256_file",
    "stratified_split",
    "write_array_split",
    "write_meta",
    "write_shards",
]
