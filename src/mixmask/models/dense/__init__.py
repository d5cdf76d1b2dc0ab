"""Dense-transfer networks over any backbone: the multi-scale maps and feature pyramids
(:mod:`.pyramid`), torchvision's Faster / Mask R-CNN on them (:mod:`.detection`) and the
segmentation heads (:mod:`.segmentation`). Each asks the backbone for a capability
(``stage_maps`` for a hierarchical one, ``feature_map`` otherwise), never for its name."""
