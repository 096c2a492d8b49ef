"""The on-disk format written by `max-deeplab convert` (no TensorFlow needed to read this).

Every converted data set is a set of TFRecord shards ``PREFIX-00000-of-0000K.tfrecord`` of
serialized `tf.train.Example` protos, plus ``PREFIX-metadata.json`` beside them.

`tf.train.Example` schema (one example per image):

=============================  =======  =====================================================
key                            type     content
=============================  =======  =====================================================
``image/encoded``              bytes    the image file (JPEG as in COCO; PNG/JPEG otherwise)
``image/format``               bytes    ``jpeg`` or ``png``
``image/height``               int64    image height in pixels
``image/width``                int64    image width in pixels
``image/id``                   int64    the COCO ``image_id``
``image/filename``             bytes    the image's file name in the source data set
``panoptic/encoded``           bytes    the COCO panoptic PNG (RGB ids,
                                        `panoptic_labels.rgb_to_id`; 0 = void),
                                        unchanged from the source
``panoptic/format``            bytes    ``png``
``segments/id``                int64[]  COCO segment id of each segment in the PNG
``segments/class``             int64[]  contiguous class index 0..C-1 of each segment
``segments/instance``          int64[]  instance id, unique per class within the image
                                        (1, 2, ... for things; 0 for stuff)
``segments/is_crowd``          int64[]  1 for COCO crowd segments
``segments/area``              int64[]  pixel count of each segment in the PNG
``segments/panoptic``          int64[]  the segment's panoptic label
                                        ``class * label_divisor + instance``, or
                                        `panoptic_labels.IGNORE_PANOPTIC` for crowd
                                        segments
=============================  =======  =====================================================

`max_deeplab.data.decode_example` turns this into a label map in the data encoding of
`max_deeplab.panoptic_labels`.
"""
from __future__ import annotations

# Version tag of the metadata JSON and of the schema above.
FORMAT_VERSION = "max_deeplab.panoptic_tfrecord.v1"

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_ID = "image/id"
IMAGE_FILENAME = "image/filename"
PANOPTIC_ENCODED = "panoptic/encoded"
PANOPTIC_FORMAT = "panoptic/format"
SEGMENTS_ID = "segments/id"
SEGMENTS_CLASS = "segments/class"
SEGMENTS_INSTANCE = "segments/instance"
SEGMENTS_IS_CROWD = "segments/is_crowd"
SEGMENTS_AREA = "segments/area"
SEGMENTS_PANOPTIC = "segments/panoptic"

SCALAR_INT_KEYS = (IMAGE_HEIGHT, IMAGE_WIDTH, IMAGE_ID)
SCALAR_BYTES_KEYS = (IMAGE_ENCODED, IMAGE_FORMAT, IMAGE_FILENAME, PANOPTIC_ENCODED,
                     PANOPTIC_FORMAT)
SEGMENT_KEYS = (SEGMENTS_ID, SEGMENTS_CLASS, SEGMENTS_INSTANCE, SEGMENTS_IS_CROWD,
                SEGMENTS_AREA, SEGMENTS_PANOPTIC)
