"""The gesture family's LightningModules: the VQ-VAEs (``vqvae``), the FGD motion encoder (``motion_encoder``) and
the MambaTalk generator (``mambatalk``); the networks they train live in ``gesture.models``."""
