"""Masked image modelling: MAE and PixMIM (``mae``), A2MIM (``a2mim``) and SiameseIM
(``siameseim``)."""
