"""Hand pose data: the on-disk sequence format, the synthetic generator, windowed datasets and the datamodule.

Import from the submodules: ``format`` (read/write/validate), ``synthetic`` (generator + CLI), ``render``,
``dataset`` (crops, mirroring, augmentation), ``datamodule`` (``HandDataModule``).
"""
