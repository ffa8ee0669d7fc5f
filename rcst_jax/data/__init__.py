"""Data: every source yields preprocessed uint8 224x224 RGB `Example`s by index.

Sources (random access, `len` + `[i]`, so runs can shard and resume):
  imagenet.imagenet2012 / imagenet_v2 / imagenette  tfds ArrayRecord, no TensorFlow
  folder.ImageFolder                                 root/<class>/<image>
  synthetic.SyntheticShapes                          embedded demo set, no download
`batches(source, indices, batch_size)` turns any of them into padded batches,
skipping and counting bad items.
"""

from rcst_jax.data.folder import ImageFolder
from rcst_jax.data.imagenet import (
    TfdsSource,
    calibration_test_split,
    imagenet2012,
    imagenet_v2,
    imagenette,
)
from rcst_jax.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    BadItemError,
    BadLabelError,
    Batch,
    Example,
    ImageSource,
    Preprocess,
    batches,
    normalize,
)
from rcst_jax.data.synthetic import SyntheticShapes

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "BadImageError", "BadItemError", "BadLabelError",
    "Batch", "Example", "ImageSource", "Preprocess", "batches", "normalize",
    "ImageFolder", "TfdsSource", "calibration_test_split", "imagenet2012", "imagenet_v2",
    "imagenette", "SyntheticShapes",
]
