"""Detection and segmentation data: one sample type (:mod:`.sample`), the readers of the
formats users have on disk (COCO JSON, Pascal VOC, ADE20k), the CIFAR mosaic proxy that
runs here, and the transforms and batching they share."""
