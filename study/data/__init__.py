"""Data for the study: a procedural shapes dataset, CIFAR-10, an ImageFolder streamed from
disk, ADM transforms and resumable loaders.  Imports nothing from the engine besides study.config."""

from study.data.config import DataConfig
from study.data.imagefolder import ImageFolderDataset, UnreadableImageError
from study.data.loader import BatchStream, iterate_eval, make_loader
from study.data.shapes import SHAPE_NAMES, generate_shapes
from study.data.sources import ImageArrayDataset, ImageDataset, build_dataset, cache_path, content_identity
from study.data.transforms import (adm_augment, center_crop_arr, random_crop_arr, random_flip, to_tensor_images,
                                   to_uint8)

__all__ = [
    "BatchStream", "DataConfig", "ImageArrayDataset", "ImageDataset", "ImageFolderDataset", "SHAPE_NAMES",
    "UnreadableImageError", "adm_augment", "build_dataset", "cache_path",
    "center_crop_arr", "content_identity", "generate_shapes", "iterate_eval", "make_loader",
    "random_crop_arr", "random_flip", "to_tensor_images", "to_uint8",
]
