"""Siamese methods: the five bases (MoCo v2, BYOL, SimSiam, Barlow Twins, VICReg) on one
:class:`~mixmask.methods.siamese.base.SiameseMethod`, and the masking axis (none | erase |
mixmask | unmix | both) every base runs with (:mod:`mixmask.methods.siamese.masking_axis`)."""
