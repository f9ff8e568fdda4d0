"""Ray wiring: the only package of ``fcas`` allowed to import ``ray`` and ``hydra``."""
