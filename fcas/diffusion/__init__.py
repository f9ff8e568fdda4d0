"""TCDM diffusion: condition building, losses (Eq. 3-4), pair sampling, scheduler glue, sampling."""
