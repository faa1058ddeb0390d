"""Downstream transfer stages driven through the frameworks the papers used: ADE20K semantic segmentation with
mmsegmentation (``repro.transfer.mmseg``) and COCO detection (detectron2 / mmdetection), with converters from our
exported encoders into each framework's backbone (``repro.transfer.convert*``). Importing this package is cheap:
the frameworks are imported inside the functions that need them."""
