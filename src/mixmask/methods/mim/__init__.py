"""Masked image modelling: MAE and PixMIM (``mae``), A2MIM (``a2mim``), SiameseIM
(``siameseim``) and the seed papers' baselines SimMIM (``simmim``) and iBOT (``ibot``)."""
