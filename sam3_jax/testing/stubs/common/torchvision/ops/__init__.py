from .boxes import masks_to_boxes  # noqa: F401
from .roi_align import RoIAlign, roi_align  # noqa: F401
