"""The one data layer: listing, opening and decoding images and captions from folders, CSV/TSV files,
WebDataset shards and the built-in shapes data, for training (skip and count bad samples), evaluation
and search (clear errors), and the frames of videos for search. Every image reader decodes through
``load_image``, every video through ``.video``.

Names are imported lazily, so that a module needing one reader does not load the training loader.
"""
from __future__ import annotations

import importlib

_API = {
    "build_train_data": "loader", "TrainData": "loader",
    "REASONS": "samples", "BadSample": "samples", "DataSourceError": "samples", "SkipCounter": "samples",
    "check_caption": "samples", "decode_caption": "samples",
    "DEFAULT_MAX_PIXELS": "images", "IMAGE_EXTENSIONS": "images", "ImageRef": "images", "ImageFiles": "images",
    "MissingImage": "images", "collate_images": "images", "is_image_name": "images", "list_images": "images",
    "load_image": "images", "read_image_bytes": "images", "ImageInfo": "images", "image_info": "images",
    "DescribedImages": "images", "collate_described": "images", "capture_time": "images",
    "CaptureTime": "exif", "upright": "exif",
    "VIDEO_EXTENSIONS": "images", "VideoFrame": "video", "VideoInfo": "video", "format_timestamp": "video",
    "is_video_name": "images", "parse_timestamp": "video", "video_capture_time": "video", "video_frame": "video",
    "video_frames": "video", "video_info": "video",
    "expand_shards": "shards", "scan_tar": "shards", "ShardImage": "shards", "shard_images": "shards",
    "table_images": "tables",
    "Table": "tables", "read_table": "tables",
    "classname_set_names": "classnames", "load_classnames": "classnames", "read_classnames": "classnames",
    "read_text_lines": "classnames",
    "ClassificationData": "classification", "read_classification": "classification",
    "CaptionData": "captions", "read_captions": "captions",
    "ShapesConfig": "shapes", "ShapesDataset": "shapes", "class_names": "shapes", "heldout_pairs": "shapes",
    "templates": "shapes", "write_classification": "shapes", "write_shapes": "shapes",
    "STYLES": "shapes", "WORLDS": "shapes", "BuiltinSpec": "shapes", "parse_builtin_spec": "shapes",
    "is_builtin_spec": "shapes", "check_styles": "shapes", "world": "shapes",
    "BuiltinSource": "sources", "CsvSource": "sources", "FolderSource": "sources", "MapSource": "sources",
    "ShardSource": "sources", "iter_pairs": "sources", "open_sources": "sources",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'clipforge.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
