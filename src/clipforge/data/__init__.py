"""Data for training and evaluation: the built-in shapes dataset, readers for CSV/TSV, caption folders
and WebDataset shards with bad-sample counting, and the deterministic, resumable training loader."""
from .loader import TrainData, build_train_data
from .samples import (DEFAULT_MAX_PIXELS, REASONS, BadSample, DataSourceError, SkipCounter, decode_caption,
                      decode_image, load_image_file)
from .shapes import (ShapesConfig, ShapesDataset, class_names, heldout_pairs, templates, write_classification,
                     write_shapes)
from .sources import BuiltinSource, CsvSource, FolderSource, MapSource, ShardSource, iter_pairs, open_sources

__all__ = ["DEFAULT_MAX_PIXELS", "REASONS", "BadSample", "BuiltinSource", "CsvSource", "DataSourceError",
           "FolderSource", "MapSource", "ShapesConfig", "ShapesDataset", "ShardSource", "SkipCounter", "TrainData",
           "build_train_data", "class_names", "decode_caption", "decode_image", "heldout_pairs", "iter_pairs",
           "load_image_file", "open_sources", "templates", "write_classification", "write_shapes"]
